"""Edit kind v0.30.0's containerd config.toml for our node image (hack/kind/node-image.sh).

    python3 containerd-config.py CONFIG_TOML SANDBOX_IMAGE

Three edits, each required to match exactly once (kind's file changing shape fails the build):
drop the fuse-overlayfs proxy plugin (rootless only; we have no fuse-overlayfs), set
sandbox_image to our pause tag, and set restrict_oom_score_adj = true (no process on these
machines may lower oom_score_adj below 0, so the sandbox's -998 would fail every pod).
"""

import re
import sys


def main() -> None:
    path, sandbox_image = sys.argv[1], sys.argv[2]
    with open(path) as f:
        text = f.read()
    edits = [
        (r'\[proxy_plugins\][^\[]*\[proxy_plugins\."fuse-overlayfs"\][^\[]*', ""),
        (r'sandbox_image = "[^"]*"', f'sandbox_image = "{sandbox_image}"'),
        (r"restrict_oom_score_adj = \w+", "restrict_oom_score_adj = true"),
    ]
    for pattern, replacement in edits:
        text, n = re.subn(pattern, replacement, text)
        if n != 1:
            sys.exit(f"{path}: {pattern!r} matched {n} times, expected 1: update {sys.argv[0]}")
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
