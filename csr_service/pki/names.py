"""Reading the SubjectAltName of a certificate or CSR: one pass, every kind of name.

Every request reads SANs several times (the CSR's rules, the issuer's check of what its
backend certified, the pipeline's check of the leaf). cryptography's
``get_values_for_type`` walks the whole list once per kind with an ``isinstance`` check
against an abstract base class; one pass comparing exact types costs a tenth of that
(~1 µs instead of ~7 µs per read), and all callers then agree on how names are read.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509

__all__ = ["SubjectAltNames", "subject_alt_names"]

#: Kinds of name we never issue, by the label error messages use.
_OTHER_KINDS: dict[type[x509.GeneralName], str] = {
    x509.RFC822Name: "e-mail",
    x509.DirectoryName: "directory name",
    x509.RegisteredID: "registered ID",
    x509.OtherName: "other name",
}


@dataclass(frozen=True, slots=True)
class SubjectAltNames:
    """The names of one SubjectAltName extension, in their order of appearance."""

    uris: tuple[str, ...] = ()
    dns_names: tuple[str, ...] = ()
    #: Textual form (``str(ipaddress)``), as configuration and requests carry them.
    ip_addresses: tuple[str, ...] = ()
    #: Labels of the other kinds present (e-mail, directory name, registered ID, other name).
    other: tuple[str, ...] = ()
    #: Whether the certificate or CSR has a SubjectAltName extension at all.
    present: bool = True

    def sorted_names(self) -> tuple[list[str], list[str], list[str]]:
        """(URIs, DNS names, IP addresses), each sorted: for order-insensitive comparisons."""
        return sorted(self.uris), sorted(self.dns_names), sorted(self.ip_addresses)


_ABSENT = SubjectAltNames(present=False)


def subject_alt_names(obj: x509.Certificate | x509.CertificateSigningRequest) -> SubjectAltNames:
    """The SubjectAltName of ``obj``; ``present=False`` (and no names) when it has none.

    Raises ``ValueError`` (or ``x509.DuplicateExtension``) for malformed extensions, like
    ``obj.extensions`` itself.
    """
    for ext in obj.extensions:
        if type(ext.value) is x509.SubjectAlternativeName:
            san = ext.value
            break
    else:
        return _ABSENT
    uris: list[str] = []
    dns: list[str] = []
    ips: list[str] = []
    other: list[str] = []
    for name in san:
        kind = type(name)
        if kind is x509.UniformResourceIdentifier:
            uris.append(name.value)
        elif kind is x509.DNSName:
            dns.append(name.value)
        elif kind is x509.IPAddress:
            ips.append(str(name.value))
        else:
            other.append(_OTHER_KINDS.get(kind, kind.__name__))
    return SubjectAltNames(tuple(uris), tuple(dns), tuple(ips), tuple(other))
