"""Fails with a traceback after some output."""

print("about to fail", flush=True)


def inner() -> None:
    raise ValueError("boom: the data is wrong")


inner()
