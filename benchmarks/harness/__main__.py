from mlx_diffusiongemma.bench.cli import main

from . import ENTRY
from . import __doc__ as DOC
from .graph import section_graph
from .peers import reference_main, section_peers
from .profile import section_profile
from .serve import section_serve
from .vision import reference_main as vision_reference_main
from .vision import section_vision

SECTIONS = {
    "peers": section_peers,
    "profile": section_profile,
    "graph": section_graph,
    "serve": section_serve,
    "vision": section_vision,
}
CHILDREN = {"_reference": reference_main, "_vision_reference": vision_reference_main}

if __name__ == "__main__":
    main(
        sections=SECTIONS,
        children=CHILDREN,
        prog="python -m benchmarks.harness",
        entry=ENTRY,
        doc=DOC,
    )
