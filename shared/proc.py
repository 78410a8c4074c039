"""Figures the Linux kernel gives in /proc, read without psutil."""


def kib_field(path: str, name: str) -> int:
    """A "Name:   1234 kB" line of a /proc file (`/proc/meminfo`, `/proc/self/status`) in bytes; 0 where the file
    or the line is missing."""
    try:
        with open(path) as lines:
            for line in lines:
                if line.startswith(f"{name}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
