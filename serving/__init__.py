"""Serving: the gRPC server over one vLLM engine.

`server` wires the parts and runs the process; `completion_service`, `feedback_service` and
`model_service` are the proto services; `convert` validates requests and converts protobuf to
records and back; `errors` turns exceptions into gRPC statuses (with `auth`'s key check);
`replica` holds what this replica serves; `engine` (with `engine_setup`, `engine_types` and
`admission`) is the engine; `hot_swap` keeps it on the registry's live version; `config` and
`metrics` are the settings and the Prometheus series. `openai` is the OpenAI-compatible HTTP API,
a second transport over the same completion core and servicers, in the same event loop.
"""
