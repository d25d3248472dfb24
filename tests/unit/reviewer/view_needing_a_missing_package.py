"""A view whose module needs a package this environment lacks, as the default views need torch in the lean image."""

import sieve_package_that_is_not_installed  # noqa: F401


def view(data: bytes) -> bytes:
    return data
