"""numpydoc's validation of every public docstring (docs/public_api.py): prints each finding and a count per check,
exits 1 if there is any. Not part of CI until the docstrings pass it: ``python docs/check_docstrings.py`` with cbn
installed, optionally with the codes of the checks to leave out (``--ignore SA01 EX01``).
"""
import argparse
import collections
import sys

import public_api  # docs/, beside this script
from numpydoc.validate import validate


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ignore", nargs="*", default=[], help="check codes to leave out, e.g. SA01 EX01 ES01")
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
