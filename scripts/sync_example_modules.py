"""Copy the example macro functions' source into the example modules' JSON.

The functions live as readable Python in ``examples/twc_tidy.py`` and
``examples/twc_stash.py``; a module carries its functions' code as a string.
Run this after editing either file (``tests/test_agent.py`` checks that the
JSON is in step with the source)::

    .venv/bin/python scripts/sync_example_modules.py
"""

from __future__ import annotations

import json
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# module file -> {function name: source file}
SOURCES = {
    "twc_expert.json": {"tidy": "twc_tidy.py"},
    "twc_harmful.json": {"stash": "twc_stash.py"},
}


def main() -> None:
    for module_name, functions in SOURCES.items():
        path = EXAMPLES / module_name
        module = json.loads(path.read_text(encoding="utf-8"))
        for fn in module["functions"]:
            if fn["name"] in functions:
                fn["code"] = (EXAMPLES / functions[fn["name"]]).read_text(encoding="utf-8")
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(module, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(path)
        print(f"updated {path}")


if __name__ == "__main__":
    main()
