"""Keep the message catalogs in step with the code (needs Babel: pip install -e ".[test]").

    python scripts/messages.py          # extract, update every catalog, compile the .mo files
    python scripts/messages.py --check  # exit 1 if a catalog is out of step (what the tests check)

New messages enter each ``.po`` file with an empty translation; translate them there and run
the script again to compile.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
from pathlib import Path

from babel.messages.catalog import Catalog
from babel.messages.extract import extract_from_dir
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po, write_po

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qwen_magic"
LOCALE_DIR = PACKAGE / "locale"
DOMAIN = "qwen_magic"
KEYWORDS = {"_": None, "N_": None, "ngettext": (1, 2)}
# The gateway answers as the service would; the tests and tools are not for users' eyes.
SKIPPED = ("gateway",)


def extracted(package: Path = PACKAGE) -> Catalog:
    """Every marked message in the package's code."""
    catalog = Catalog(domain=DOMAIN, project="qwen_magic", charset="utf-8")
    method_map = [("**.py", "python")]
    for filename, lineno, message, comments, context in extract_from_dir(
        str(package), method_map, keywords=KEYWORDS, comment_tags=("Translators:",), strip_comment_tags=True
    ):
        if filename.split("/")[0] in SKIPPED:
            continue
        catalog.add(message, None, [(f"qwen_magic/{filename}", lineno)], auto_comments=comments, context=context)
    return catalog


def po_path(language: str, locale_dir: Path = LOCALE_DIR) -> Path:
    return locale_dir / language / "LC_MESSAGES" / f"{DOMAIN}.po"


def languages(locale_dir: Path = LOCALE_DIR) -> list[str]:
    return sorted(p.name for p in locale_dir.iterdir() if (p / "LC_MESSAGES").is_dir())


def read_catalog(language: str, locale_dir: Path = LOCALE_DIR) -> Catalog:
    path = po_path(language, locale_dir)
    with path.open("rb") as file:
        return read_po(file, locale=language, domain=DOMAIN)


def updated(language: str, template: Catalog, locale_dir: Path = LOCALE_DIR) -> Catalog:
    catalog = read_catalog(language, locale_dir)
    template.creation_date = catalog.creation_date  # the catalog changes only when its messages do
    # No fuzzy matching: a guessed translation of a changed message would be shown as right.
    catalog.update(template, no_fuzzy_matching=True)
    catalog.fuzzy = False  # a fuzzy header would leave Plural-Forms out of the .mo
    return catalog


def po_bytes(catalog: Catalog) -> bytes:
    buffer = io.BytesIO()
    # Files without line numbers: moving code does not change the catalog.
    write_po(buffer, catalog, width=100, sort_output=False, ignore_obsolete=True, include_lineno=False)
    return buffer.getvalue()


def mo_bytes(catalog: Catalog) -> bytes:
    buffer = io.BytesIO()
    write_mo(buffer, catalog)
    return buffer.getvalue()


_FIELD = re.compile(r"(?<!\{)\{([^{}]*)\}")


def fields(text: str) -> set[str]:
    """The named fields of a message: ``{model}``, ``{cost:.4f}`` (doubled braces are literal)."""
    return set(_FIELD.findall(text))


def problems(package: Path = PACKAGE, locale_dir: Path = LOCALE_DIR) -> list[str]:
    """What is wrong with the catalogs against the code: untranslated or mistranslated messages."""
    template = extracted(package)
    found = []
    for language in languages(locale_dir):
        catalog = updated(language, template, locale_dir)
        for message in catalog:
            if not message.id:
                continue
            ids = message.id if isinstance(message.id, tuple) else (message.id,)
            strings = message.string if isinstance(message.string, tuple) else (message.string,)
            if message.fuzzy or not all(strings):
                found.append(f"{language}: no translation of {ids[0]!r}")
                continue
            for string in strings:
                if fields(string) != fields(ids[0]):
                    found.append(f"{language}: the fields of {ids[0]!r} differ in {string!r}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="Change nothing; exit 1 if a catalog is out of step.")
    args = parser.parse_args(argv)
    template = extracted()
    stale = []
    for language in languages():
        catalog = updated(language, template)
        po, mo = po_bytes(catalog), mo_bytes(catalog)
        mo_path = po_path(language).with_suffix(".mo")
        for path, content in ((po_path(language), po), (mo_path, mo)):
            if path.exists() and path.read_bytes() == content:
                continue
            stale.append(path.relative_to(ROOT))
            if not args.check:
                path.write_bytes(content)
    for problem in problems():
        print(problem)
    if args.check and stale:
        print("Out of step with the code: " + ", ".join(map(str, stale)) + " (run python scripts/messages.py)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
