"""The language of every line the package prints: Simplified Chinese or English.

Messages are written in English in the code, marked with ``_()`` (translated where they are
used) or ``N_()`` (marked where they are defined as constants, translated with ``_()`` when
shown). The Chinese catalog is ``locale/zh/LC_MESSAGES/qwen_magic.po``, compiled to the
``.mo`` file beside it that ships in the wheel; ``scripts/messages.py`` extracts, updates and
compiles it (``tests/test_i18n.py`` fails on a message without a translation). A third
language is one more catalog and one more entry in ``LANGUAGES``.

Messages are whole sentences with named fields (``{model}``), filled in after translation,
so that each language keeps its own word order.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:  # pragma: no cover
    import gettext

DOMAIN = "qwen_magic"
LOCALE_DIR = Path(__file__).with_name("locale")
# The languages with a catalog, and English, the language the messages are written in.
LANGUAGES = ("en", "zh")
SETTINGS = ("auto", *LANGUAGES)
# The locale variables, in the order that decides (the first one set wins).
LOCALE_VARIABLES = ("LC_ALL", "LC_MESSAGES", "LANG", "LANGUAGE")

_translations: dict[str, "gettext.NullTranslations"] = {}
_current: "gettext.NullTranslations | None" = None  # None: English, as the messages are written
_current_language = "en"


def locale_language(environ: Mapping[str, str] | None = None) -> str:
    """The language the kernel's locale asks for: any ``zh*`` locale is Chinese, the rest English."""
    environ = os.environ if environ is None else environ
    for variable in LOCALE_VARIABLES:
        value = environ.get(variable, "").strip()
        if value:
            # LANGUAGE may list several (zh_CN:en); the first is the one preferred.
            first = value.split(":")[0].lower()
            return "zh" if first.startswith("zh") else "en"
    return "en"


def resolve(setting: str, environ: Mapping[str, str] | None = None) -> str:
    """``auto`` follows the locale; ``zh`` and ``en`` are taken as given."""
    if setting == "auto":
        return locale_language(environ)
    if setting not in LANGUAGES:
        raise ValueError(f"unknown language {setting!r}; choose one of {', '.join(SETTINGS)}")
    return setting


def _translation(language: str) -> "gettext.NullTranslations | None":
    if language == "en":
        return None
    if language not in _translations:
        import gettext  # here, not at %load_ext: an English session never needs it

        # fallback=False: a catalog missing from the install is a packaging error, not English.
        _translations[language] = gettext.translation(DOMAIN, LOCALE_DIR, languages=[language])
    return _translations[language]


def use(setting: str) -> str:
    """Make ``setting`` (auto, zh or en) the language of what is printed next; return the language."""
    global _current, _current_language
    language = resolve(setting)
    if language != _current_language:
        _current, _current_language = _translation(language), language
    return language


def current_language() -> str:
    return _current_language


def _(message: str) -> str:
    """``message`` in the current language (as written if the catalog has no translation)."""
    return message if _current is None else _current.gettext(message)


def ngettext(singular: str, plural: str, count: int) -> str:
    """The form of a message for ``count`` (Chinese has one form, English two)."""
    if _current is None:
        return singular if count == 1 else plural
    return _current.ngettext(singular, plural, count)


def N_(message: str) -> str:
    """Mark a message defined as a constant; translate it with ``_()`` where it is shown."""
    return message
