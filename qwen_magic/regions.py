"""Which DashScope region a call goes to, and so which price sheet and currency apply.

Beijing (the mainland site) bills in yuan; Singapore (the international site) in US dollars.
Costs, budgets and limits are always in the region's currency, and spend recorded in one
currency is never added to spend in the other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .catalog import BUILTIN_PATH, INTL_PATH
from .i18n import N_, _


@dataclass(frozen=True)
class Currency:
    code: str  # ISO 4217, as the history file records it
    symbol: str
    english_name: str  # marked with N_; ``name`` is it in the current language

    @property
    def name(self) -> str:
        """In sentences: "an amount in yuan"."""
        return _(self.english_name)


YUAN = Currency("CNY", "¥", N_("yuan"))
DOLLARS = Currency("USD", "$", N_("US dollars"))
CURRENCIES = {currency.code: currency for currency in (YUAN, DOLLARS)}


@dataclass(frozen=True)
class Region:
    key: str  # as recorded in the history file and set in QwenMagic.region
    english_name: str  # marked with N_; ``name`` is it in the current language
    currency: Currency
    sheet: Path  # the built-in price sheet

    @property
    def name(self) -> str:
        return _(self.english_name)


BEIJING = Region("beijing", N_("Beijing (mainland site)"), YUAN, BUILTIN_PATH)
SINGAPORE = Region("singapore", N_("Singapore (international site)"), DOLLARS, INTL_PATH)
REGIONS = {region.key: region for region in (BEIJING, SINGAPORE)}

# dashscope 2.x's DASHSCOPE_REGION values. The other international regions (Hong Kong,
# Virginia, Frankfurt, Tokyo) bill in dollars too; the Singapore sheet is the one we have.
_SDK_REGIONS = {
    "cn-beijing": BEIJING,
    "ap-southeast-1": SINGAPORE,
    "cn-hongkong": SINGAPORE,
    "us-east-1": SINGAPORE,
    "eu-central-1": SINGAPORE,
    "ap-northeast-1": SINGAPORE,
}


def region_named(name: str) -> Region | None:
    """A region by our key (beijing, singapore) or dashscope's (cn-beijing, ap-southeast-1...)."""
    name = name.strip().lower()
    return REGIONS.get(name) or _SDK_REGIONS.get(name)


def region_of_host(base_url: str | None) -> Region | None:
    """The region a DashScope endpoint is in, from its host (None for any other server)."""
    if not base_url:
        return None
    try:
        host = (urlsplit(base_url).hostname or "").lower()
    except ValueError:
        return None
    if host == "dashscope-intl.aliyuncs.com" or host.endswith(".ap-southeast-1.maas.aliyuncs.com"):
        return SINGAPORE
    if host == "dashscope.aliyuncs.com" or host.endswith(".cn-beijing.maas.aliyuncs.com"):
        return BEIJING
    for sdk_name, region in _SDK_REGIONS.items():  # workspace hosts: {workspace}.{region}.maas...
        if host.endswith(f".{sdk_name}.maas.aliyuncs.com"):
            return region
    return None


def resolve_region(override: str | None, base_url: str | None = None) -> Region:
    """``QwenMagic.region`` if set, else the base URL's host, else DASHSCOPE_REGION, else Beijing.

    ``base_url`` is the one the call uses (a cell's --base-url or QwenMagic.base_url); without
    one, the SDK's own DASHSCOPE_BASE_URL / DASHSCOPE_HTTP_BASE_URL are looked at.
    """
    if override:
        region = region_named(override)
        if region is not None:
            return region
    for url in (base_url, os.environ.get("DASHSCOPE_BASE_URL"), os.environ.get("DASHSCOPE_HTTP_BASE_URL")):
        if url:
            found = region_of_host(url)
            if found is not None:
                return found
            break  # the endpoint in use is another server: its region is not in its name
    named = os.environ.get("DASHSCOPE_REGION")
    if named and region_named(named) is not None:
        return region_named(named)  # type: ignore[return-value]
    return BEIJING
