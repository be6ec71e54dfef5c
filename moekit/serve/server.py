"""Running the app under uvicorn: SIGTERM (or Ctrl-C) stops accepting, flips /health to 503, lets running requests
finish within the drain timeout, then exits 0. A model that fails to load stops the server with its reason."""

from __future__ import annotations

import uvicorn

from moekit.serve.api import ServerState, build_app


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig, frame) -> None:
        self.state.status = "draining"
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal once drained (exit status -15): a drained stop exits 0, a clean stop to
        # supervisors
        getattr(self, "_captured_signals", []).clear()


def run_server(load, host: str, port: int, api_key: str | None, drain_timeout: float, log_level: str = "info") -> None:
    app, state = build_app(load, api_key)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_timeout, access_log=False
    )
    server = _DrainingServer(config, state)
    state.on_failed = lambda: setattr(server, "should_exit", True)
    server.run()
    if state.error is not None:  # the model did not load: say why, in one line, as every moekit command does
        raise ValueError(f"loading the model failed: {state.error}")
