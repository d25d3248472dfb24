"""A view that imports a missing package only when called, as the aligned view imports torch in the lean image."""


def view(data: bytes) -> bytes:
    import sieve_package_that_is_not_installed  # noqa: F401

    return data
