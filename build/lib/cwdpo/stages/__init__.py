from cwdpo.stages.base import StageModule
from cwdpo.stages.cw_dpo import CWDPOModule
from cwdpo.stages.sft_c import SFTCModule

__all__ = ["CWDPOModule", "SFTCModule", "StageModule"]
