"""Print the requirements declared in setup.cfg, for `pip install $(python .ci/requirements.py [extra ...])`.

setup.cfg is the project's only packaging file; pip cannot install a folder that has no
pyproject.toml or setup.py, so the README installs the declared requirements directly and
runs the code from the repository root.
"""

import configparser
import sys
from pathlib import Path

cfg = configparser.ConfigParser()
cfg.read(Path(__file__).resolve().parent.parent / "setup.cfg", encoding="utf-8")
reqs = cfg["options"]["install_requires"].split("\n")
for extra in sys.argv[1:]:
    reqs += cfg["options.extras_require"][extra].split("\n")
print(" ".join(r.strip() for r in reqs if r.strip() and not r.strip().startswith("#")))
