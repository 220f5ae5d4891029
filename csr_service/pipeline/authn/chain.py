"""``--authenticators a,b,...``: several authenticators in order, as istiod has them.

The first authenticator that recognises the call's credential (a client certificate, a
bearer token) decides, and its verdict is final: a token that fails review is not then tried
as something else, so an error names the one check that failed. Without any credential that
one of them recognises the call is refused with UNAUTHENTICATED, naming what was expected.
"""

from __future__ import annotations

from collections.abc import Sequence

from csr_service.common.errors import AuthenticationError
from csr_service.common.request import RequestContext
from csr_service.plugins.authenticator import AuthenticatorAbilities, Caller

__all__ = ["AuthenticatorChain"]


class AuthenticatorChain:
    """Asks the first authenticator that recognises the call (see the module docstring)."""

    def __init__(self, authenticators: Sequence[AuthenticatorAbilities]) -> None:
        if not authenticators:
            raise ValueError("at least one authenticator")
        self.members = tuple(authenticators)
        self.name = ",".join(a.name for a in self.members)

    async def authenticate(self, ctx: RequestContext) -> Caller:
        for member in self.members:
            if member.recognizer is None or member.recognizer.recognizes(ctx):
                return await member.authenticator.authenticate(ctx)
        raise AuthenticationError(
            "authentication failed: no credential (a bearer token or a client certificate) was presented",
            detail=f"no credential recognised by any of --authenticators {self.name}",
        )
