"""The collectives in a compiled layer's HLO are the contract's (layout_spec), kind, axes, bytes.

The HLO side is read by hlo_collectives from what XLA:CPU compiles for the shard_map layer; the
expected side is perf_model.layer_collectives (the analytical model, written from the same
contract), and for one layout a list written out by hand here.
"""

from __future__ import annotations

import collections

import jax
import numpy as np
import pytest

from efficientlm import partitioning
from efficientlm.inference import hlo_collectives, perf_model
from efficientlm.inference.layout_spec import Collective, Layout
from efficientlm.inference.partitioned_decoder import PartitionedDecoder
from efficientlm.models.config import TransformerConfig

MESH_SHAPE = (2, 2, 2)
B, PROMPT, SLOTS = 8, 6, 8


def config(**kw) -> TransformerConfig:
  base = dict(vocab_size=32, emb_dim=16, num_heads=8, head_dim=4, mlp_dim=32,
              num_encoder_layers=0, num_decoder_layers=1, dtype='float32')
  return TransformerConfig(**{**base, **kw})


# One instruction per line, as XLA prints it (split here only to keep the source narrow).
HLO = '\n'.join([
    'HloModule jit_layer, is_scheduled=true',
    '%region_0.0 (a: f32[], b: f32[]) -> f32[] {',
    '  %a = f32[] parameter(0)',
    '  %b = f32[] parameter(1)',
    '  ROOT %add = f32[] add(%a, %b)',
    '}',
    'ENTRY %main.1 (p0: f32[8,4], p1: bf16[16,2]) -> f32[8,16] {',
    '  %p0 = f32[8,4]{1,0} parameter(0)',
    '  %p1 = bf16[16,2]{1,0} parameter(1)',
    '  %ag = f32[8,16]{1,0} all-gather(%p0), channel_id=1, '
    'replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={1}, use_global_device_ids=true',
    '  %ags = (f32[8,4]{1,0}, f32[16,4]{1,0}) all-gather-start(f32[8,4]{1,0} %p0), '
    'channel_id=2, replica_groups=[4,2]<=[8], dimensions={0}, use_global_device_ids=true',
    '  %agd = f32[16,4]{1,0} all-gather-done(%ags)',
    '  %rs = f32[8,2]{1,0} reduce-scatter(%p0), channel_id=3, '
    'replica_groups=[4,2]<=[2,2,2]T(0,2,1), dimensions={1}, to_apply=%region_0.0',
    '  %ar = (f32[8,4]{1,0}, bf16[16,2]{1,0}) all-reduce(%p0, /*index=1*/%p1), channel_id=4, '
    'replica_groups=[2,4]<=[2,4]T(1,0), use_global_device_ids=true, to_apply=%region_0.0',
    '  %s0 = f32[2,4]{1,0} slice(%p0), slice={[0:2], [0:4]}',
    '  %a2a = (f32[2,4]{1,0}, f32[2,4]{1,0}) all-to-all(%s0, %s0), channel_id=5, '
    'replica_groups={{0,4},{1,5},{2,6},{3,7}}',
    '  %all = f32[8,4]{1,0} all-reduce(%p0), channel_id=6, replica_groups={}, '
    'to_apply=%region_0.0',
    '  ROOT %out = f32[8,16]{1,0} copy(%ag)',
    '}',
])


def test_parser_on_handwritten_hlo(mesh):
  got = hlo_collectives.collectives_in_hlo(HLO, mesh)
  # Device i of the (2, 2, 2) mesh is at (x, y, z) = (i // 4, i // 2 % 2, i % 2).
  assert got == [
      Collective('all-gather', ('y', 'z'), 8 * 16 * 4),
      Collective('all-gather', ('z',), 16 * 4 * 4),  # start/done counted once
      Collective('reduce-scatter', ('y',), 8 * 4 * 4),  # groups {0,2},{1,3},...
      Collective('all-reduce', ('x', 'z'), 8 * 4 * 4),  # a combined all-reduce: per operand
      Collective('all-reduce', ('x', 'z'), 16 * 2 * 2),
      Collective('all-to-all', ('x',), 2 * 2 * 4 * 4),  # the tuple form is one array
      Collective('all-reduce', ('x', 'y', 'z'), 8 * 4 * 4),
  ]


def test_replica_group_formats():
  parse = hlo_collectives.parse_replica_groups
  assert parse('replica_groups={{0,1},{2,3}}, x=1', 4) == [[0, 1], [2, 3]]
  assert parse('replica_groups=[2,2]<=[4], x=1', 4) == [[0, 1], [2, 3]]
  assert parse('replica_groups=[4,2]<=[2,2,2]T(0,2,1)', 8) == [[0, 2], [1, 3], [4, 6], [5, 7]]
  assert parse('replica_groups={}', 3) == [[0, 1, 2]]
  assert parse('channel_id=1', 2) == [[0, 1]]


def test_group_that_is_not_a_submesh_raises(mesh):
  bad = HLO.replace('{{0,1,2,3},{4,5,6,7}}', '{{0,1,2,4},{3,5,6,7}}')
  with pytest.raises(ValueError, match='not a whole sub-mesh'):
    hlo_collectives.collectives_in_hlo(bad, mesh)


def hlo_of(mesh, cfg, layout, phase, quantized=False):
  length = PROMPT if phase == 'prefill' else 1
  layer = PartitionedDecoder(cfg, layout, mesh).layer_fn(phase, B, length, SLOTS, quantized)
  return hlo_collectives.collectives_of(layer.compile(), mesh)


def test_2d_serial_decode_by_hand(mesh):
  """2d, MHA (K = 8: sharded KV over Ah = y, z, x), gated MLP, decode: b = 8, L = 1, d = 4."""
  got = hlo_of(mesh, config(), Layout('2d', 'heads'), 'decode')
  bl, d, e, f, h, k, hd = 8, 4, 16, 32, 8, 8, 4
  ain, aout = 2, 4
  residual = bl * e // ain * d
  expected = [
      Collective('all-gather', ('y', 'z'), residual),  # attention input over Aout
      Collective('all-reduce', ('x',), bl * 4),  # RMSNorm sum of squares
      Collective('reduce-scatter', ('x',), bl * (h + 2 * k) * hd // aout * d),  # q, k, v
      Collective('all-gather', ('x',), bl * h // aout * hd * d),  # attention output
      Collective('reduce-scatter', ('y', 'z'), residual),
      Collective('all-gather', ('y', 'z'), residual),  # feed-forward
      Collective('all-reduce', ('x',), bl * 4),
      Collective('reduce-scatter', ('x',), bl * 2 * f // aout * d),
      Collective('all-gather', ('x',), bl * f // aout * d),
      Collective('reduce-scatter', ('y', 'z'), residual),
  ]
  assert collections.Counter(got) == collections.Counter(expected)


# Every ffn layout, every attention layout, both blocks; MHA / MQA / GQA change which K, V
# collectives appear (sharded KV: in the reduce-scatter and the weight gathers; replicated:
# one all-reduce over Ain).
CASES = [
    ('1d', 'batch_xyz', 'serial', 2),
    ('2d', 'heads', 'serial', None),
    ('2d', 'batch_z', 'serial', 1),
    ('wg_x', 'batch_yz', 'serial', 2),
    ('wg_xy', 'heads', 'serial', 1),
    ('wg_xyz', 'heads', 'serial', None),
    ('2d', 'batch_yz', 'parallel', 2),
    ('wg_x', 'heads', 'parallel', None),
]


@pytest.mark.parametrize('phase', ['prefill', 'decode'])
@pytest.mark.parametrize('ffn,attention,block,kv', CASES,
                         ids=[f'{c[0]}-{c[1]}-{c[2]}-kv{c[3]}' for c in CASES])
def test_layer_collectives_match_perf_model(mesh, ffn, attention, block, kv, phase):
  cfg = config(num_kv_heads=kv, parallel_block=block == 'parallel')
  layout = Layout(ffn, attention, block)
  got = hlo_of(mesh, cfg, layout, phase)
  model = perf_model.ModelSpec.from_transformer_config(cfg)
  length = PROMPT if phase == 'prefill' else 1
  expected = perf_model.layer_collectives(model, layout, B, length, MESH_SHAPE, 4, 4)
  assert expected, 'every layout on a (2, 2, 2) mesh has collectives'
  assert collections.Counter(got) == collections.Counter(expected)


def test_int8_weights_gather_int8(mesh):
  """int8 weights: the weight-gathered all-gathers move int8 (weight_bytes = 1); the scales
  are stored replicated over Ab, so there is no extra collective."""
  cfg = config(num_kv_heads=1)
  layout = Layout('wg_x', 'batch_z')
  got = hlo_of(mesh, cfg, layout, 'decode', quantized=True)
  model = perf_model.ModelSpec.from_transformer_config(cfg)
  expected = perf_model.layer_collectives(model, layout, B, 1, MESH_SHAPE, 4, 1)
  assert collections.Counter(got) == collections.Counter(expected)


def test_layer_fn_runs(mesh):
  layer = PartitionedDecoder(config(), Layout('1d', 'batch_z'), mesh).layer_fn(
      'decode', B, 1, SLOTS)
  x, cache_k, _ = layer.fn(*layer.example_args())
  assert x.shape == (B, 1, 16) and cache_k.shape == (B, SLOTS, 8, 4)
  assert np.isfinite(np.asarray(x)).all()
  assert x.sharding.spec == jax.sharding.PartitionSpec(None, None, ('x', 'y', 'z'))


@pytest.mark.parametrize('mesh_shape,ffn,attention', [((4, 2, 1), '2d', 'batch_yz'),
                                                      ((1, 2, 4), 'wg_x', 'heads')])
def test_other_mesh_shapes(mesh_shape, ffn, attention):
  """Size-1 axes: their collectives vanish; a device order other than the default is mapped
  back through the executable's device assignment."""
  devices = list(reversed(jax.devices()))
  mesh = partitioning.create_mesh(mesh_shape, ('x', 'y', 'z'), devices=devices)
  cfg, layout = config(num_kv_heads=2), Layout(ffn, attention)
  layer = PartitionedDecoder(cfg, layout, mesh).layer_fn('decode', B, 1, SLOTS)
  got = hlo_collectives.collectives_of(layer.compile(), mesh)
  model = perf_model.ModelSpec.from_transformer_config(cfg)
  expected = perf_model.layer_collectives(model, layout, B, 1, mesh_shape, 4, 4)
  assert collections.Counter(got) == collections.Counter(expected)
