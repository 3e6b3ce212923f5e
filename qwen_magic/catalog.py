"""The model catalog: limits, prices and rate limits, as data.

The built-in ``models.toml`` ships with the package; a user's ``models.toml`` (in the
config directory, or the file named by ``QWEN_MAGIC_MODELS``) and the
``QwenMagic.models`` trait override any figure or add models, because prices change.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from stat import S_ISREG
from typing import Any, Mapping

from .i18n import N_, _

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BUILTIN_PATH = Path(__file__).with_name("models.toml")
# The international site's sheet (Singapore), in US dollars; see regions.py.
INTL_PATH = Path(__file__).with_name("models-intl.toml")
THINKING_MODES = ("none", "hybrid", "only")


class CatalogError(ValueError):
    """A catalog file or override that cannot be used; the message names where and why."""


@dataclass(frozen=True)
class PriceTier:
    """Prices in yuan per 1,000,000 tokens for requests of up to ``up_to`` input tokens."""

    input: float
    output: float
    up_to: int | None = None
    thinking_output: float | None = None


@dataclass(frozen=True)
class ModelInfo:
    name: str
    tiers: tuple[PriceTier, ...] = ()
    context: int | None = None
    max_input: int | None = None
    max_output: int | None = None
    thinking: str = "none"
    template_extra_tokens: int = 0
    vision: bool = False
    retired: bool = False
    free_quota: int | None = None
    free_quota_days: int | None = None
    qpm: int | None = None
    tpm: int | None = None
    # The regions whose Batch API serves the model (dashscope's region names: cn-beijing,
    # ap-southeast-1); empty: not offered in batch.
    batch_regions: tuple[str, ...] = ()
    source: str = ""
    as_of: str = ""
    # Structured output: True where the model takes response_format json_schema (strict);
    # elsewhere --schema asks for json_object with the schema in the system prompt.
    json_schema: bool = False
    # Context cache (the sheet's [cache] lists, or the model's own keys): implicit reads are
    # billed at 20% of the input price, explicit ones (--cache) at 10%.
    implicit_cache: bool = False
    explicit_cache: bool = False
    # The free quota is granted for input and for output each (the international site).
    free_quota_each_way: bool = False
    # Price of 1,000 web searches (usage.plugins.search), where the sheet gives one.
    search_price: float | None = None

    @property
    def priced(self) -> bool:
        return bool(self.tiers)

    def tier_for(self, input_tokens: int) -> PriceTier | None:
        """The tier a request with this many input tokens is billed at."""
        for tier in self.tiers:
            if tier.up_to is None or input_tokens <= tier.up_to:
                return tier
        return self.tiers[-1] if self.tiers else None

    def extra_input_tokens(self, thinking: bool) -> int:
        """Tokens the server's chat template adds (an empty think block when not thinking)."""
        return 0 if thinking else self.template_extra_tokens


NOT_A_BOOLEAN = N_("{where}: {name}.{key} must be true or false, not {value}")
_MODEL_FIELDS = {f.name for f in fields(ModelInfo)} - {"name", "tiers"}
_SHORTHAND = {"input", "output", "thinking_output"}  # one flat tier, for user additions
_TIER_FIELDS = {f.name for f in fields(PriceTier)}


def _model_from(name: str, data: Mapping[str, Any], base: ModelInfo | None, where: str) -> ModelInfo:
    unknown = set(data) - _MODEL_FIELDS - _SHORTHAND - {"tiers"}
    if unknown:
        raise CatalogError(_("{where}: model {name} has unknown keys {keys}").format(
            where=where, name=repr(name), keys=sorted(unknown)))
    values: dict[str, Any] = {key: data[key] for key in data if key in _MODEL_FIELDS}
    for key in ("context", "max_input", "max_output", "free_quota", "free_quota_days", "qpm", "tpm",
                "template_extra_tokens"):
        if key in values and values[key] is not None:
            if not isinstance(values[key], int) or isinstance(values[key], bool) or values[key] < 0:
                raise CatalogError(_("{where}: {name}.{key} must be a whole number >= 0, not {value}").format(
                    where=where, name=name, key=key, value=repr(values[key])))
    for key in ("vision", "retired", "json_schema"):
        if key in values and not isinstance(values[key], bool):
            raise CatalogError(_(NOT_A_BOOLEAN).format(where=where, name=name, key=key, value=repr(values[key])))
    if "batch_regions" in values:
        regions = values["batch_regions"]
        if not isinstance(regions, (list, tuple)) or not all(isinstance(r, str) and r for r in regions):
            raise CatalogError(_("{where}: {name}.batch_regions must be a list of region names, e.g. "
                                 "[\"cn-beijing\"]").format(where=where, name=name))
        values["batch_regions"] = tuple(regions)
    for key in ("implicit_cache", "explicit_cache", "free_quota_each_way"):
        if key in values and not isinstance(values[key], bool):
            raise CatalogError(_(NOT_A_BOOLEAN).format(where=where, name=name, key=key, value=repr(values[key])))
    price = values.get("search_price")
    if price is not None and (not isinstance(price, (int, float)) or isinstance(price, bool) or price < 0):
        raise CatalogError(_("{where}: {name}.search_price must be a number >= 0 (per 1,000 searches)").format(
            where=where, name=name))
    if values.get("thinking", "none") not in THINKING_MODES:
        raise CatalogError(_("{where}: {name}.thinking must be one of {modes}").format(
            where=where, name=name, modes=THINKING_MODES))
    if "tiers" in data:
        values["tiers"] = _tiers_from(name, data["tiers"], where)
    elif _SHORTHAND & set(data):
        if not {"input", "output"} <= set(data):
            raise CatalogError(_("{where}: {name} needs both 'input' and 'output' prices (yuan per 1M tokens)").format(
                where=where, name=name))
        values["tiers"] = _tiers_from(name, [{k: data[k] for k in _SHORTHAND if k in data}], where)
    if base is not None:
        return replace(base, **values)
    return ModelInfo(name=name, **values)


def _tiers_from(name: str, raw: Any, where: str) -> tuple[PriceTier, ...]:
    if not isinstance(raw, list) or not raw:
        raise CatalogError(_("{where}: {name}.tiers must be a non-empty list").format(where=where, name=name))
    tiers = []
    for index, item in enumerate(raw):
        if not isinstance(item, Mapping) or set(item) - _TIER_FIELDS or not {"input", "output"} <= set(item):
            raise CatalogError(_("{where}: {name}.tiers[{index}] needs input and output prices, and nothing else "
                                 "but up_to and thinking_output").format(where=where, name=name, index=index))
        prices = [item["input"], item["output"], item.get("thinking_output", 0)]
        if any(not isinstance(p, (int, float)) or isinstance(p, bool) or p < 0 for p in prices):
            raise CatalogError(_("{where}: {name}.tiers[{index}] prices must be numbers >= 0").format(
                where=where, name=name, index=index))
        tiers.append(PriceTier(input=float(item["input"]), output=float(item["output"]),
                               up_to=item.get("up_to"),
                               thinking_output=None if item.get("thinking_output") is None
                               else float(item["thinking_output"])))
    bounds = [t.up_to for t in tiers]
    if bounds[-1] is not None or any(b is None for b in bounds[:-1]) or bounds[:-1] != sorted(bounds[:-1]):
        raise CatalogError(_("{where}: {name}.tiers need rising up_to bounds, and none on the last tier").format(
            where=where, name=name))
    return tuple(tiers)


@dataclass(frozen=True)
class Catalog:
    models: Mapping[str, ModelInfo]
    sources: tuple[str, ...] = ()

    def get(self, name: str) -> ModelInfo | None:
        return self.models.get(name)

    def with_overrides(self, overrides: Mapping[str, Mapping[str, Any]], where: str) -> "Catalog":
        """A catalog where ``overrides`` change figures of known models or add new ones."""
        if not overrides:
            return self
        models = dict(self.models)
        for name, data in overrides.items():
            if not isinstance(data, Mapping):
                raise CatalogError(_("{where}: {name} must map to a table of figures").format(
                    where=where, name=repr(name)))
            models[name] = _model_from(name, data, models.get(name), where)
        return Catalog(models, (*self.sources, where))

    def vision_models(self) -> list[str]:
        return [m.name for m in self.models.values() if m.vision and not m.retired]


def _read(path: Path) -> Mapping[str, Mapping[str, Any]]:
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise CatalogError(_("{path}: not valid TOML ({error})").format(path=path, error=error)) from None
    models = document.get("models", {})
    if not isinstance(models, Mapping):
        raise CatalogError(_("{path}: [models] must be a table of model names").format(path=path))
    return _with_cache_lists(models, document.get("cache", {}), path)


def _with_cache_lists(models: Mapping[str, Mapping[str, Any]], cache: Any, path: Path) -> Mapping[str, Mapping[str, Any]]:
    """The [cache] section's implicit / explicit lists as each model's flags (its own keys win)."""
    if not cache:
        return models
    if not isinstance(cache, Mapping) or set(cache) - {"implicit", "explicit"}:
        raise CatalogError(_("{path}: [cache] holds only the lists implicit and explicit").format(path=path))
    merged = {name: dict(data) if isinstance(data, Mapping) else data for name, data in models.items()}
    for kind in ("implicit", "explicit"):
        names = cache.get(kind, [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise CatalogError(_("{path}: [cache].{kind} must be a list of model names").format(path=path, kind=kind))
        for name in names:
            entry = merged.get(name)
            if isinstance(entry, dict):
                entry.setdefault(f"{kind}_cache", True)
    return merged


@functools.lru_cache(maxsize=2)
def builtin_catalog(path: Path = BUILTIN_PATH) -> Catalog:
    """A shipped sheet (Beijing's by default), read and checked once per process."""
    catalog = Catalog({}, ()).with_overrides(_read(path), str(path))
    for model in catalog.models.values():
        if not model.priced or model.max_input is None:
            raise CatalogError(_("{path}: {model} lacks prices or limits").format(path=path, model=model.name))
    return Catalog(catalog.models, (f"built-in {path.name}",))


def user_catalog_path() -> Path:
    """Where a user's catalog overrides live (QWEN_MAGIC_MODELS names another file)."""
    named = os.environ.get("QWEN_MAGIC_MODELS")
    if named:
        return Path(named).expanduser()
    return _default_user_catalog_path(os.environ.get("XDG_CONFIG_HOME"), os.environ.get("HOME"))


@functools.lru_cache(maxsize=4)
def _default_user_catalog_path(_config_home: str | None, _home: str | None) -> Path:
    """Asked of platformdirs once per value of what it reads (the arguments, only a key)."""
    from platformdirs import user_config_dir

    return Path(user_config_dir("qwen-magic")) / "models.toml"


@functools.lru_cache(maxsize=4)
def _users_over(sheet: Path, path: Path, _stamp: tuple[int, ...]) -> Catalog:
    """The built-in ``sheet`` with the user's file over it, read again once the file changed."""
    return builtin_catalog(sheet).with_overrides(_read(path), str(path))


def load_catalog(overrides: Mapping[str, Mapping[str, Any]] | None = None, sheet: Path = BUILTIN_PATH) -> Catalog:
    """Built-in figures (the region's ``sheet``), then the user's file, then the trait's overrides."""
    catalog = builtin_catalog(sheet)
    path = user_catalog_path()
    try:
        stat = path.stat()
    except (OSError, ValueError):
        stat = None
    if stat is not None and S_ISREG(stat.st_mode):
        catalog = _users_over(sheet, path, (stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size, stat.st_ino))
    return catalog.with_overrides(overrides or {}, "QwenMagic.models")
