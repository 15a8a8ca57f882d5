#!/usr/bin/env python3
"""edgesync merge program (docs/PROTOCOL.md §3.8 [[desired.conflict]] policy = "merge").

    [[desired.conflict]]
    keys = "schedule"
    policy = "merge"
    command = ["/usr/local/lib/edgesync/merge.py"]

Runs when the cloud sets a key that the device changed since the cloud last saw it. Gets
{"key": K, "device": D, "cloud": C} as JSON on stdin and prints the value to apply as JSON;
a non-zero exit makes the key "failed" (stderr's last line is the error).

This one merges member by member: for two objects the cloud's members win and members only
the device has are kept (null from the cloud removes a member); two arrays are united in
order without repeats; anything else: the cloud's value.
"""

import json
import sys


def merge(device, cloud):
    if isinstance(device, dict) and isinstance(cloud, dict):
        out = dict(device)
        for k, v in cloud.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = merge(device.get(k), v)
        return out
    if isinstance(device, list) and isinstance(cloud, list):
        out = list(device)
        out.extend(v for v in cloud if v not in device)
        return out
    return cloud


def main():
    try:
        req = json.load(sys.stdin)
        value = merge(req["device"], req["cloud"])
    except (ValueError, KeyError, TypeError) as e:
        print(f"merge: bad input: {e}", file=sys.stderr)
        return 1
    json.dump(value, sys.stdout, separators=(",", ":"))
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
