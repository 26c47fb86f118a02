"""aot/hlo.py: counting the collectives in optimized HLO text, with their result bytes."""

from idm_jax.aot import hlo

# A hand-written module in the optimized-HLO form XLA's TPU compiler prints.
HLO = """\
HloModule jit_train_step, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%all-reduce-scatter.3 (input_0: f32[32,96], input_1: f32[64]) -> (f32[32,32], f32[16]) {
  %input_0 = f32[32,96]{0,1:T(8,128)} parameter(0)
  %all-reduce.9 = (f32[32,128]{0,1:T(8,128)}, f32[64]{0:T(128)}) all-reduce(%pad.1, %input_1), channel_id=4, replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %tuple.2 = (f32[32,32]{0,1}, f32[16]{0}) tuple(%a, %b)
}

%body.1 (p: (s32[], bf16[4,4])) -> (s32[], bf16[4,4]) {
  %ag = bf16[4,4]{1,0:T(4,128)(2,1)} all-gather(%x), channel_id=1, dimensions={0}, metadata={op_name="jit(f)/all-gather(x)"}
  ROOT %t = (s32[], bf16[4,4]) tuple(%i, %ag)
}

ENTRY %main.5 (param: f32[8]) -> f32[8] {
  %all-gather-start.2 = (bf16[2,1024]{1,0}, bf16[8,1024]{1,0}) all-gather-start(%param.1), channel_id=2, dimensions={0}
  %all-gather-done.2 = bf16[8,1024]{1,0} all-gather-done(%all-gather-start.2)
  %cp-start = (f32[8]{0}, f32[8]{0}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%param), channel_id=3, source_target_pairs={{0,1},{1,0}}
  %cp-done = f32[8]{0} collective-permute-done(%cp-start)
  %ar = (f32[8]{0}, /*index=1*/f32[8]{0}) all-reduce(%param, %param), channel_id=5, to_apply=%add
  %fusion.7 = f32[8]{0} fusion(%ar), kind=kLoop, calls=%all-reduce-scatter.3, metadata={op_name="all-reduce(x)"}
  %not = f32[8]{0} add(%all-reduce.1, %param)
  ROOT %w = (s32[], bf16[4,4]) while(%init), condition=%cond, body=%body.1
}
"""


def test_collectives_counts_each_op_once_with_its_result_bytes():
  c = hlo.collectives(HLO)
  # The async all-gather once (its gathered result: 8 x 1024 bf16) plus the one in the loop body.
  assert c['all-gather'] == (2, 8 * 1024 * 2 + 4 * 4 * 2)
  # collective-permute-start's tuple is (operand, result, contexts): the result only.
  assert c['collective-permute'] == (1, 8 * 4)
  # A combined all-reduce: the sum of its results, through a /*index=1*/ comment.
  assert c['all-reduce'] == (1, 2 * 8 * 4)
  # The all-reduce inside an all-reduce-scatter fusion is TPU's reduce-scatter.
  assert c['reduce-scatter'] == (1, (32 * 128 + 64) * 4)
  # Names in operands, calls= and metadata are not ops; nothing else is a collective.
  assert set(c) == {'all-gather', 'collective-permute', 'all-reduce', 'reduce-scatter'}


def test_collectives_of_a_module_without_any_is_empty():
  assert (
    hlo.collectives('ENTRY %m (p: f32[2]) -> f32[2] {\n  ROOT %a = f32[2]{0} add(%p, %p)\n}') == {}
  )
