"""The shipped gradient methods, one module each; importing a module registers its method. A new method is
one more module here, imported below (the order of these imports is the order of GRAD_METHODS)."""

# isort: off
from refl.step.methods import refl  # noqa: F401
from refl.step.methods import draft  # noqa: F401
from refl.step.methods import draft_lv  # noqa: F401
from refl.step.methods import alignprop  # noqa: F401
from refl.step.methods import direct_align  # noqa: F401
# isort: on
