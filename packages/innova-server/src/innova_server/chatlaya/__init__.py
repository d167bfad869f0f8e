"""Chatlaya, the chat copilot: conversations, messages and replies streamed over SSE.

- `store`: conversations, messages and stream slots in MongoDB;
- `service`: the logic (get-or-create, history budget, one streamed turn);
- `sse`: event framing, pings, client-disconnect detection;
- `router` / `schemas`: the HTTP surface of DESIGN §5.
"""
