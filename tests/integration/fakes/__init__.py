"""Fake SAP BTP services for the tpmail integration tests (standard library
only, loopback only, every server bounded and closed by its owner):

* ``xsuaa.TokenService``: OAuth2 client credentials per tenant (Host header)
* ``destination_service.DestinationService``: find-destination, failure
  injection, OAuth2 access/refresh tokens and codes for mail users, and an
  introspection endpoint for Dovecot's oauth2 passdb
* ``socks5.Socks5Proxy``: the Connectivity Proxy's SOCKS5 with method 0x80
* ``world.FakeBtp``: all of them wired together, with service keys on disk

Each module also runs as a script (``python3 tests/integration/fakes/X.py
--help``); ``selftest.py`` checks them standalone.
"""

__all__ = ["TokenService", "PROVIDER", "DestinationService", "Socks5Proxy", "REP_NAMES",
           "sap_socks5_connect", "FakeBtp", "write_secret_dir"]

from .xsuaa import TokenService, PROVIDER  # noqa: F401
from .destination_service import DestinationService  # noqa: F401
from .socks5 import Socks5Proxy, REP_NAMES, sap_socks5_connect  # noqa: F401
from .world import FakeBtp, write_secret_dir  # noqa: F401
