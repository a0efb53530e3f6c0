"""The router's OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions, /v1/models, /health.

Requests go through the same validation (router/request_validation.build_request) and dispatch
(Dispatcher.generate) as the gRPC Serving API: this package only translates JSON to a
tandem.v1.GenerateRequest and GenerateResponse messages back to OpenAI's JSON and SSE shapes.
"""
