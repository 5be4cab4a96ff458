"""Print a pip configuration for use inside an image build, taken from this machine's.

Reads `pip config list` (scope.key='value' for every configuration file and PIP_* variable in
force) on standard input and keeps what reaches a package index from inside a build: index
URLs, trusted hosts, proxy, timeouts and retries. It leaves out what names files of this
machine (find-links, constraint, file: index URLs, and the CA bundle, which the build receives
as a separate secret). Later scopes override earlier ones, as in pip.

    pip config list | python3 pip_build_conf.py > pip.conf
"""

import re
import sys

KEEP = (
    "index-url",
    "extra-index-url",
    "trusted-host",
    "proxy",
    "timeout",
    "default-timeout",
    "retries",
)
LINE = re.compile(r"[^.]*\.([\w-]+)=(.*)")


def build_conf(lines) -> str:
    settings = {}
    for line in lines:
        match = LINE.fullmatch(line.strip())
        if match and match[1] in KEEP:
            values = [v for v in match[2].strip("'\"").split() if not v.startswith("file:")]
            if values:
                settings[match[1]] = " ".join(values)
    return "".join(["[global]\n", *(f"{k} = {v}\n" for k, v in settings.items())])


if __name__ == "__main__":
    sys.stdout.write(build_conf(sys.stdin))
