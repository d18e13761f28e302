"""Placeholder replaced below."""
from blazec.report import PassReport


def moe_dispatch_pass(gm, ctx):
    return PassReport("moe_dispatch")
