"""smtpguard: a filtering SMTP front-end proxy.

The public surface is small on purpose: everything not named here may change.
"""

from smtpguard.errors import ConfigError, StoreError, UpstreamError

__version__ = "0.1.0"

__all__ = ["ConfigError", "StoreError", "UpstreamError", "__version__"]
