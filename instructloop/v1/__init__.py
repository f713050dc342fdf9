"""The generated gRPC stubs, under their first import path: `from instructloop.v1 import x_pb2`.

They ship in the client distribution (client/, `instructloop_client.v1`), which applications
install without the server's dependencies, and which this package depends on. Every module
generated there is imported here once and registered as `instructloop.v1.<name>` too: one
import of each generated file, so each message has one class and the descriptor pool one entry,
whichever path imported it. A new .proto needs nothing here after `make protos`.
"""

import importlib
import pkgutil
import sys

from instructloop_client import v1 as _generated

__all__: list[str] = []

for _info in pkgutil.iter_modules(_generated.__path__):
    _module = importlib.import_module(f"{_generated.__name__}.{_info.name}")
    globals()[_info.name] = _module
    sys.modules[f"{__name__}.{_info.name}"] = _module
    __all__.append(_info.name)
