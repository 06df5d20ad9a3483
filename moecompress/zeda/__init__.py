"""ZEDA: zero-expert self-distillation (``moecompress zeda``).

A post-trained MoE gets zero experts in every router (:mod:`moecompress.zero`) and learns to use
them from itself: the teacher is the frozen original, the student the same weights plus the zero
rows, held once (:mod:`.student`: the teacher's forward is the student's with the zero rows masked
out and the original k). Stage 1 distils teacher-generated text (forward KL), stage 2 the student's
own samples (reverse KL), both with a group balancing loss steering the zero experts' share toward
the target skip rate (:mod:`.losses`, pure functions). :mod:`.train` runs it; the result is a
zero-expert checkpoint every tool reads.
"""
