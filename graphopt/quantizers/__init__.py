"""Quantizer schemes: one registry, one module per scheme.

``parse("int8:channel")`` picks a scheme by its spec's first word; ``from_node(fake_quant)``
gives back the quantizer a ``FakeQuant`` node carries. The back ends (torch, Q/DQ, QOperator)
and the ``quantize`` pass dispatch through these and never decode a scheme's attributes.
Adding a scheme is one module that subclasses ``Quantizer`` and is decorated with
``@register``, imported below.
"""

from graphopt.quantizers import (  # noqa: F401,E402  - registers the built-in schemes, one module each
    apot,
    binary,
    dorefa,
    dynamic,
    kmeans,
    pow2,
    pwlq,
    term,
    ternary,
    uniform,
    zoo,
)
from graphopt.quantizers.base import (  # noqa: F401
    DOMAIN,
    FAKE_QUANT,
    KINDS,
    Lowered,
    Quantizer,
    add_fake_quant,
    apply,
    apply_node,
    from_node,
    get,
    is_fake_quant,
    params_of,
    parse,
    register,
    schemes,
    weight_step,
)
from graphopt.quantizers.dynamic import Dynamic  # noqa: F401,E402
from graphopt.quantizers.uniform import Uniform, bias_quantizer, range_from_histogram  # noqa: F401,E402
