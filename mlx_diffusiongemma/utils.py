"""Small helpers that several modules share."""


def ceil_div(a: int, b: int) -> int:
    """The smallest integer n with n * b >= a (b > 0): how many b-sized pieces cover a."""
    return -(-a // b)
