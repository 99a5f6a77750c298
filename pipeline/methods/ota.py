"""Online Trajectory Alignment (FlowSteer Alg. 2): PeRFlow's chord objective on the teacher's own states.

Window starts and ends are authentic teacher states z_{s_k} = ODESolve(teacher, eps, 1 -> s_k): the
trajectory store's boundary states, plus a `train.online_fraction` share of each batch rolled out fresh
by the frozen teacher (DataSource.segments), so the student never trains from points the teacher does not
visit (the teacher-trajectory mismatch of PeRFlow's interpolated starts). The batch and loss are
common.OnTrajectoryChordMethod, which flowsteer shares (flowsteer minus its GAN is exactly ota).
"""
from __future__ import annotations

from pipeline.methods.base import register
from pipeline.methods.common import OnTrajectoryChordMethod


@register
class OTA(OnTrajectoryChordMethod):
    name = "ota"
    description = ("Online Trajectory Alignment (FlowSteer, Alg. 2): PeRFlow's chord loss on windows that start "
                   "and end on the teacher's own ODE trajectory (cached plus fresh online rollouts).")
    ladder_rank = 20            # FlowSteer Table 5: + online trajectory alignment
