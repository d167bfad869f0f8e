"""Finding model files, choosing one, the startup errors, registration, the FIFO slot — no model loaded."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from innova_provider_smollm import SmolLMSettings, make_local
from innova_provider_smollm.model import LocalModel, ModelFileError, choose_model, find_models
from innova_provider_smollm.slots import FifoSlot, FifoSlots
from innova_server.plugins import PluginRegistry
from innova_server.settings import ConfigError, Settings


def _touch(directory: Path, *names: str) -> None:
    for name in names:
        (directory / name).write_bytes(b"GGUF")


def test_a_directory_lists_its_gguf_files_by_stem(tmp_path: Path) -> None:
    _touch(tmp_path, "b-model.gguf", "a-model.GGUF", "notes.txt")
    models = find_models(tmp_path)
    assert list(models) == ["a-model", "b-model"]
    assert models["b-model"] == tmp_path / "b-model.gguf"


def test_a_file_is_its_own_single_model(tmp_path: Path) -> None:
    _touch(tmp_path, "smollm2-1.7b-instruct-q4_k_m.gguf")
    assert list(find_models(tmp_path / "smollm2-1.7b-instruct-q4_k_m.gguf")) == ["smollm2-1.7b-instruct-q4_k_m"]


@pytest.mark.parametrize("case", ["missing", "empty", "not-gguf"])
def test_unusable_paths_say_where_we_looked_and_how_to_download(tmp_path: Path, case: str) -> None:
    path = {"missing": tmp_path / "nope", "empty": tmp_path, "not-gguf": tmp_path / "model.bin"}[case]
    if case == "not-gguf":
        path.write_bytes(b"x")
    with pytest.raises(ModelFileError) as error:
        find_models(path)
    assert str(path.resolve()) in str(error.value)
    assert "README_SMOLLM.md" in str(error.value)


def test_chat_model_picks_a_file_by_stem(tmp_path: Path) -> None:
    _touch(tmp_path, "a.gguf", "b.gguf")
    models = find_models(tmp_path)
    assert choose_model(models, None) == ("a", tmp_path / "a.gguf")
    assert choose_model(models, "b") == ("b", tmp_path / "b.gguf")
    with pytest.raises(ModelFileError, match="'c' is not one of the GGUF files found: a, b"):
        choose_model(models, "c")


def test_settings_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    names = ("MODEL_PATH", "N_CTX", "N_THREADS", "LOAD", "MAX_QUEUE", "PARALLEL", "PROMPT_CHUNK")
    for name in names:
        monkeypatch.delenv(f"SMOLLM_{name}", raising=False)
    settings = SmolLMSettings(_env_file=None)
    assert settings.smollm_model_path == Path("backend/smollm-1.7b-instruct")
    assert settings.smollm_load == "startup" and settings.smollm_max_queue == 4
    options = settings.llama_options()
    assert options.n_ctx == 2048 and options.n_threads >= 1
    assert options.parallel == 4 and options.prompt_chunk == 32
    kwargs = options.llama_kwargs()
    assert kwargs["verbose"] is False
    # With several slots the batch engine has its own context: the `Llama` object's own stays tiny.
    assert kwargs["n_ctx"] < options.n_ctx


def test_one_slot_is_the_llama_objects_own_context(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMOLLM_PARALLEL", "1")
    options = SmolLMSettings(_env_file=None).llama_options()
    assert options.parallel == 1 and options.llama_kwargs()["n_ctx"] == 2048


def test_a_missing_model_stops_the_start_with_the_reason(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SMOLLM_MODEL_PATH", str(tmp_path / "missing"))
    with pytest.raises(ConfigError) as error:
        make_local(Settings(_env_file=None, env="test", provider="local"))
    (line,) = error.value.lines
    assert "SMOLLM_MODEL_PATH" in line and str(tmp_path / "missing") in line and "README_SMOLLM.md" in line


def test_bad_settings_stop_the_start_with_one_line_per_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMOLLM_N_CTX", "lots")
    monkeypatch.setenv("SMOLLM_LOAD", "sometimes")
    monkeypatch.setenv("SMOLLM_MAX_QUEUE", "-1")
    monkeypatch.setenv("SMOLLM_PARALLEL", "0")
    with pytest.raises(ConfigError) as error:
        make_local(Settings(_env_file=None, env="test", provider="local"))
    lines = error.value.lines
    names = ["SMOLLM_N_CTX", "SMOLLM_LOAD", "SMOLLM_MAX_QUEUE", "SMOLLM_PARALLEL"]
    assert [line.split(":")[0] for line in lines] == names
    assert all("\n" not in line for line in lines)
    assert "lots" not in str(error.value) and "sometimes" not in str(error.value)  # values are not echoed


def test_bad_settings_are_a_warning_at_registration_not_silence(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("SMOLLM_N_CTX", "lots")
    with caplog.at_level("WARNING", logger="innova.smollm"):
        registry = PluginRegistry.load(Settings(_env_file=None, env="test"))
    assert registry.provider_entry("local").models == ()
    assert "SMOLLM_N_CTX" in caplog.text


def test_the_server_refuses_to_start_without_a_model(start_server, monkeypatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SMOLLM_MODEL_PATH", str(tmp_path))
    with pytest.raises(ConfigError, match=r"holds no \.gguf file"):
        start_server(provider="local")


def test_registered_with_the_files_found(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _touch(tmp_path, "small.gguf", "large.gguf")
    monkeypatch.setenv("SMOLLM_MODEL_PATH", str(tmp_path))
    registry = PluginRegistry.load(Settings(_env_file=None, env="test"))
    entry = registry.provider_entry("local")
    assert entry.plugin == "local" and entry.models == ("large", "small") and entry.default_model == "large"
    with pytest.raises(ConfigError, match="CHAT_MODEL='medium' is not a model of provider 'local'"):
        registry.resolve_model(entry, "medium")


def test_registered_without_models_when_the_path_is_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SMOLLM_MODEL_PATH", str(tmp_path / "missing"))
    registry = PluginRegistry.load(Settings(_env_file=None, env="test"))
    assert registry.provider_entry("local").models == ()
    assert "local" not in registry.errors


def test_a_gguf_without_chat_template_is_refused() -> None:
    class NoTemplate:
        def __init__(self) -> None:
            self.metadata = {"general.name": "base model"}

    model = LocalModel.__new__(LocalModel)
    model.path, model.llama = Path("base.gguf"), NoTemplate()
    with pytest.raises(ModelFileError, match="no chat template"):
        model._chat_formatter()


def test_the_slot_serves_waiters_in_arrival_order_and_skips_the_cancelled() -> None:
    async def main() -> list[str]:
        slot, order = FifoSlot(), []
        await slot.acquire()

        async def wait(name: str) -> None:
            await slot.acquire()
            order.append(name)
            await asyncio.sleep(0.01)
            slot.release()

        tasks = {name: asyncio.create_task(wait(name)) for name in "abcd"}
        await asyncio.sleep(0.01)
        assert slot.waiting == 4
        tasks["b"].cancel()
        await asyncio.sleep(0.01)
        assert slot.waiting == 3
        slot.release()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        assert not slot.held and slot.waiting == 0
        return order

    assert asyncio.run(main()) == ["a", "c", "d"]


def test_the_slot_passes_on_a_handover_to_a_cancelled_waiter() -> None:
    async def main() -> None:
        slot = FifoSlot()
        await slot.acquire()
        first = asyncio.create_task(slot.acquire())
        second = asyncio.create_task(slot.acquire())
        await asyncio.sleep(0.01)
        slot.release()  # handed to `first`…
        first.cancel()  # …which is cancelled before it runs
        await asyncio.gather(first, return_exceptions=True)
        await asyncio.wait_for(second, 1)
        assert slot.held
        slot.release()
        assert not slot.held

    asyncio.run(main())


def test_several_slots_serve_at_once_then_in_arrival_order() -> None:
    async def main() -> list[str]:
        slots, order = FifoSlots(2), []
        await slots.acquire()
        await slots.acquire()  # both taken without waiting
        assert slots.full and slots.in_use == 2

        async def wait(name: str) -> None:
            await slots.acquire()
            order.append(name)

        tasks = [asyncio.create_task(wait(name)) for name in "abc"]
        await asyncio.sleep(0.01)
        assert slots.waiting == 3
        slots.release()  # one freed: the oldest waiter, and only it
        await asyncio.sleep(0.01)
        assert order == ["a"] and slots.waiting == 2
        slots.release()
        slots.release()
        await asyncio.gather(*tasks)
        assert slots.in_use == 2
        return order

    assert asyncio.run(main()) == ["a", "b", "c"]
