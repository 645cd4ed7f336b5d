"""Default DCS and IAM endpoints per region (FACTS.md section 4)."""

from __future__ import annotations

from dataclasses import dataclass

# Open Telekom Cloud. The eu-ch2 DCS host is inferred from the other eu-ch2 service hosts;
# no source names it, which is why every endpoint can be overridden in the config.
_OTC = {
    "eu-de": ("https://dcs.eu-de.otc.t-systems.com", "https://iam.eu-de.otc.t-systems.com/v3"),
    "eu-nl": ("https://dcs.eu-nl.otc.t-systems.com", "https://iam.eu-nl.otc.t-systems.com/v3"),
    "eu-ch2": (
        "https://dcs.eu-ch2.sc.otc.t-systems.com",
        "https://iam-pub.eu-ch2.sc.otc.t-systems.com/v3",
    ),
}

# Huawei Cloud regions from the official SDK's DCS region table.
_HUAWEI_REGIONS = frozenset(
    {
        "af-south-1",
        "ae-ad-1",
        "ap-southeast-1",
        "ap-southeast-2",
        "ap-southeast-3",
        "ap-southeast-4",
        "ap-southeast-5",
        "cn-east-2",
        "cn-east-3",
        "cn-north-1",
        "cn-north-4",
        "cn-south-1",
        "cn-southwest-2",
        "eu-west-0",
        "eu-west-101",
        "la-north-2",
        "la-south-2",
        "me-east-1",
        "my-kualalumpur-1",
        "na-mexico-1",
        "ru-moscow-1",
        "ru-northwest-2",
        "sa-brazil-1",
        "tr-west-1",
    }
)


@dataclass(frozen=True)
class Endpoints:
    """Base URLs of the two services the exporter talks to."""

    dcs: str
    iam: str  # includes the /v3 prefix


def default_endpoints(region: str) -> Endpoints | None:
    """Return the built-in endpoints of a known region, or None for an unknown one."""
    if region in _OTC:
        dcs, iam = _OTC[region]
        return Endpoints(dcs=dcs, iam=iam)
    if region in _HUAWEI_REGIONS:
        return Endpoints(
            dcs=f"https://dcs.{region}.myhuaweicloud.com",
            iam=f"https://iam.{region}.myhuaweicloud.com/v3",
        )
    return None


def known_regions() -> list[str]:
    """All regions with built-in endpoints, sorted, for error messages."""
    return sorted({*_OTC, *_HUAWEI_REGIONS})
