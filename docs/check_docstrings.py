"""numpydoc's validation of every public docstring (docs/public_api.py): prints each finding and a count per check,
exits 1 if there is any. ``.ci/docs`` runs it (``python docs/check_docstrings.py``, with cbn installed).

Every check is required but those of ``IGNORED``, numpydoc's optional sections, which the projects of the NumPy
ecosystem commonly leave out too (scikit-learn, pandas); ``--ignore`` sets other codes to leave out (``--ignore``
alone: none, every check).
"""
import argparse
import collections
import sys

import public_api  # docs/, beside this script
from numpydoc.validate import validate

IGNORED = {
    "ES01": "an extended summary: many names say all there is in their summary line",
    "SA01": "a See Also section: the docstrings name and link the related names in their text",
    "EX01": "an Examples section on every name: the user guide's pages hold the examples (run as doctests)",
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ignore", nargs="*", default=sorted(IGNORED), help="check codes to leave out (default: "
                   + ", ".join(sorted(IGNORED)) + ")")
    ignore = set(p.parse_args(argv).ignore)
    counts, seen = collections.Counter(), set()
    for name in public_api.public_names():
        result = validate(name)
        if result["file"] is not None and (result["file"], result["file_line"]) in seen:
            continue  # an inherited method, validated under its first name
        seen.add((result["file"], result["file_line"]))
        for code, message in result["errors"]:
            if code not in ignore:
                counts[code] += 1
                print(f"{name}: {code} {message}")
    print(", ".join(f"{code} {n}" for code, n in counts.most_common()) or "no findings")
    return 1 if counts else 0


if __name__ == "__main__":
    sys.exit(main())
