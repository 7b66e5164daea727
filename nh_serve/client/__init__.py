"""The HTTP client of the nh-serve service (:mod:`~nh_serve.client.http`) and the wire format of
its arrays (:mod:`~nh_serve.client.wire`). Importing it does not import torch."""

from nh_serve.client.http import Client, RequestRejected, ServerError, SessionNotFound

__all__ = ["Client", "RequestRejected", "SessionNotFound", "ServerError"]
