"""Short-query decode (stub, replaced below)."""
DECODE_TEMPLATE = ""
def use_decode(plan, q, v):
    return False
def decode_forward(plan, q, k, v):
    raise NotImplementedError
