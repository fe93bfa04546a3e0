"""Sphinx extension: drop repeated inline ``<script>`` blocks from each page.

Sphinx 7.4 re-adds the inline scripts that extensions register after the builder starts
under the file name ``''`` instead of ``None``, so its own duplicate check misses them and
each appears twice per page. For sphinx-thebe 0.3.1 the second copy re-declares
``const THEBE_JS_URL`` and throws "Identifier 'THEBE_JS_URL' has already been declared" in
every browser console.
"""

from __future__ import annotations


def _drop_repeats(app, pagename, templatename, context, doctree) -> None:
    seen: set[tuple[str, str]] = set()
    unique = []
    for script in context.get("script_files", []):
        key = (script.filename or "", str(script.attributes.get("body", "")))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def setup(app):
    app.connect("html-page-context", _drop_repeats)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
