"""Registration methods behind one interface (:class:`end2reg_ros.types.RegistrationMethod`).

``make_method(name, **options)`` builds a method by the name used on the command line
(``end2reg evaluate --method NAME``) and by the node's ``method`` parameter.
Imports are lazy so that asking for a classical method never imports torch.
"""

from __future__ import annotations

from end2reg_ros.types import RegistrationMethod

CLASSICAL_METHODS = ("fpfh-ransac-icp", "icp-prior", "oracle")
LEARNED_METHODS = ("end2reg", "two-stage", "no-seg", "soft-mask")
METHOD_NAMES = CLASSICAL_METHODS + LEARNED_METHODS


def make_method(name: str, **options) -> RegistrationMethod:
    """Build the registration method called ``name`` (see ``METHOD_NAMES``)."""
    if name in CLASSICAL_METHODS:
        from end2reg_ros.registration.classical import make_classical_method

        return make_classical_method(name, **options)
    if name in LEARNED_METHODS:
        from end2reg_ros.model.inference import make_learned_method

        return make_learned_method(name, **options)
    raise ValueError(f"unknown registration method {name!r}; choose one of {', '.join(METHOD_NAMES)}")
