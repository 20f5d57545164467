from . import ENTRY
from . import __doc__ as DOC
from .cli import main
from .fullshape import section_build, section_fullwidth, section_gpu_step
from .graph import section_graph
from .lora import section_lora
from .peers import reference_main, section_peers
from .profile import section_profile
from .serve import section_serve
from .sudoku import section_sudoku
from .vision import reference_main as vision_reference_main
from .vision import section_vision

SECTIONS = {
    "build": section_build,
    "fullwidth": section_fullwidth,
    "gpu-step": section_gpu_step,
    "lora": section_lora,
    "peers": section_peers,
    "profile": section_profile,
    "graph": section_graph,
    "serve": section_serve,
    "vision": section_vision,
    "sudoku": section_sudoku,
}
CHILDREN = {"_reference": reference_main, "_vision_reference": vision_reference_main}

if __name__ == "__main__":
    main(SECTIONS, CHILDREN, ENTRY, DOC)
