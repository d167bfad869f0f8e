"""Chatlaya, the chat copilot: conversations, a tree of messages, replies streamed over SSE.

- `router` / `schemas`: the HTTP surface (packages/innova-server/README.md, "Chatlaya");
- `service`: the queries — conversations, the current branch, feedback, usage;
- `replies`: what a request does to a reply — open (send, edit, regenerate), resume, stop;
- `turns`: a reply's life, outside any request — generation, fan-out, checkpoints, the end;
- `streams`: what a client reads, from any position, on any process (event ids);
- `branches` / `tree` / `history`: the current branch, paths in the tree, what the model is sent;
- `titles`: titles written by the model; `usage`: tokens per user per day;
- `store` (conversations, stream slots) / `messages`: MongoDB;
- `sse`: event framing, pings, client-disconnect detection.

docs/architecture.md tells how they fit together.
"""
