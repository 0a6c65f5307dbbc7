"""
Mutation check of the muP tests: apply each muP bug to a copy of the project, run the tests, and
list the ones that fail. Every mutation must make at least one behavioural test fail (one that
measures what the model or the optimizer does, not one that restates a formula of model.py).
Not collected by pytest (it runs pytest); every test file against every mutation takes about
an hour on 2 cores, --first (each mutation's first failing behavioural test, formula tests left
out) a few minutes.

$ python tests/mutations.py                       # every mutation, the muP test files
$ python tests/mutations.py --first               # enough to show that each is caught
$ python tests/mutations.py --only=readout_not_scaled,hidden_lr_sqrt_m --all_tests
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# name -> (what the bug is, file, the text, what replaces it). The text must occur exactly once.
MUTATIONS = {
    'hidden_lr_sqrt_m': ("hidden matrices' Adam lr / sqrt(m), not / m", 'mup.py',
                         "lr_exponent = -c.mup_hidden_lr_exponent", "lr_exponent = -0.5"),
    'readout_not_scaled': ("no 1/m on the readout", 'model.py',
                           "return super().forward(x) * (self.output_mult / self.width_mult)",
                           "return super().forward(x) * self.output_mult"),
    'fan_in_only_as_embedding': ("a weight whose fan-in alone grows (a headwise gate) treated as an embedding",
                                 'mup.py', "        elif growing == [fan_in]:\n            kind = 'output'\n",
                                 "        elif growing == [fan_in]:\n            kind = 'embedding'\n"),
    'output_lr_not_scaled': ("an output weight's Adam lr not / m (its init still sigma / m)", 'mup.py',
                             "'output':    Rule(init=-1.0, lr=-1.0,", "'output':    Rule(init=-1.0, lr=0.0,"),
    'output_init_not_scaled': ("an output weight's init sigma, not sigma / m (its lr still / m)", 'mup.py',
                               "'output':    Rule(init=-1.0,", "'output':    Rule(init=0.0,"),
    'embedding_fan_in_as_linear': ("an nn.Embedding's fan-in taken as dim 1, as a Linear's (wte becomes an output weight)",
                                   'mup.py', "    if isinstance(owner, nn.Embedding):\n        return 0\n",
                                   "    if isinstance(owner, nn.Embedding):\n        return 1\n"),
    'readout_scaled_twice': ("the untied readout also an output weight: lr / m besides its forward's 1/m", 'mup.py',
                             "        elif owner is model.lm_head:\n            kind = 'readout'\n",
                             "        elif owner is model.lm_head:\n            kind = 'output'\n"),
    'hidden_init_not_scaled': ("no sigma / sqrt(m) on the hidden init", 'mup.py',
                               "'hidden':    Rule(init=-0.5,", "'hidden':    Rule(init=0.0,"),
    'attention_1_over_sqrt_d': ("SP's 1/sqrt(d_head) logit scale under muP", 'model.py',
                                "self.scale = config.mup_attn_mult * math.sqrt(config.base_head_dim) / config.head_dim",
                                "self.scale = config.mup_attn_mult / math.sqrt(config.head_dim)"),
    'weight_decay_not_scaled': ("hidden weight decay not x m (so lr * wd shrinks like 1/m)", 'mup.py',
                                "decay = weight_decay / width_lr #", "decay = weight_decay #"),
    'generate_without_readout_mult': ("generate samples from logits without the readout multiplier", 'generate.py',
                                      "logits = logits[:, -1, :]",
                                      "logits = logits[:, -1, :] * self.config.width_mult / self.config.mup_output_mult"),
    'classified_by_name': ("a parameter is 'hidden' by its name, not by its shape", 'mup.py',
                           "if len(growing) >= 2:",
                           "if name.endswith(('q.weight', 'k.weight', 'v.weight', 'c_proj.weight', 'c_fc.weight')):"),
    'scale_twice_with_score_mod': ("the logit scale applied again before a score_mod", 'model.py',
                                   "return self.score_mod(score, b, h, q_idx + q_offset, kv_idx)",
                                   "return self.score_mod(score * self.scale, b, h, q_idx + q_offset, kv_idx)"),
    'depth_lr_sign_swapped': ("CompleteP's in-block lr x m_L^(1 - alpha), the exponent's sign swapped", 'mup.py',
                              "depth_lr = c.depth_mult ** (c.mup_depth_alpha - 1)",
                              "depth_lr = c.depth_mult ** (1 - c.mup_depth_alpha)"),
    'no_residual_branch_mult': ("no m_L^-alpha on the residual branches", 'model.py',
                                "self.residual_mult = config.depth_mult ** -config.mup_depth_alpha",
                                "self.residual_mult = 1.0"),
    'depth_eps_sign_swapped': ("CompleteP's in-block Adam eps x m_L^alpha, not m_L^-alpha", 'mup.py',
                               "eps_scale *= c.depth_mult ** -c.mup_depth_alpha",
                               "eps_scale *= c.depth_mult ** c.mup_depth_alpha"),
    'muon_lr_over_m': ("AdamW's 1/m put on Muon's hidden lr", 'mup.py',
                       "            width_lr = muon_lr_mult\n            decay = weight_decay\n",
                       "            width_lr = muon_lr_mult / info.width_mult\n"
                       "            decay = weight_decay * info.width_mult\n"),
    'rope_restarts_when_the_cache_slides': ("a sliding RoPE cache rotates new tokens by their place in the window, not their position",
                                            'generate.py', "        return self.dropped + self.length\n",
                                            "        return self.length\n"),
    'export_without_the_query_fold': ("the export leaves the logit scale's ratio out of the query projection", 'hf.py',
                                      "                    state[prefix + name] = ratio * state[prefix + name]\n",
                                      "                    state[prefix + name] = state[prefix + name]\n"),
    'export_without_the_residual_fold': ("the export leaves CompleteP's residual multiplier out of the output projections",
                                         'hf.py', "                state[prefix + name] = residual * state[prefix + name]\n",
                                         "                state[prefix + name] = state[prefix + name]\n"),
    'export_without_the_input_fold': ("the export leaves the input multiplier out of wte", 'hf.py',
                                      "    state['transformer.wte.weight'] = c.mup_input_mult * state['transformer.wte.weight']\n",
                                      "    state['transformer.wte.weight'] = state['transformer.wte.weight']\n"),
    'export_without_the_readout_fold': ("the export leaves output_mult / m out of an untied lm_head", 'hf.py',
                                        "        state['lm_head.weight'] = readout * model.lm_head.weight.detach().float()\n",
                                        "        state['lm_head.weight'] = model.lm_head.weight.detach().float()\n"),
    'beta_half_life_inverted': ("an EMA's beta raised to B0 / B, not B / B0, when the batch changes", 'transfer.py',
                                "    half_lives = B / B0 #", "    half_lives = B0 / B #"),
    'decay_timescale_not_held': ("weight decay left as tuned when the lr, the batch or the length change", 'transfer.py',
                                 "        weight_decay=tuned.weight_decay * decay_factor,", "        weight_decay=tuned.weight_decay,"),
    'critical_batch_ignored': ("the lr keeps growing with the batch past the critical batch", 'transfer.py',
                               "    lr_batch = B if not critical_batch_tokens else min(B, critical_batch_tokens)",
                               "    lr_batch = B"),
    'embedding_lr_mult_on_every_group': ("the SP control's embedding lr multiplier applied to every group", 'mup.py',
                                         "        lr_scale = width_lr\n",
                                         "        lr_scale = width_lr * c.embedding_lr_mult\n"),
    'router_as_embedding': ("the MoE router treated as an embedding (init sigma, lr eta), not an output weight",
                            'model.py', "        self.router = nn.Linear(d, n, bias=False)\n",
                            "        self.router = nn.Linear(d, n, bias=False)\n        self.router.weight.fan_in_dim = 0\n"),
    'expert_fan_in_from_the_expert_dim': ("an expert matrix's fan-in read from its expert dim (n_expert, fixed)",
                                          'model.py', "p.fan_in_dim = 2 #", "p.fan_in_dim = 0 #"),
    'base_n_expert_ignored': ("n_expert growing with the width unseen: the base model given this model's n_expert",
                              'mup.py', "    if c.mup_base_n_expert:\n        experts = dict(",
                              "    if False:\n        experts = dict("),
    'muon_rms_matched': ("Moonshot's RMS-matched Muon update, 0.2 sqrt(max(A, B)), at a fixed lr", 'muon.py',
                         "return math.sqrt(max(1.0, fan_out / fan_in))",
                         "return 0.2 * math.sqrt(max(fan_out, fan_in))"),
}

# tests that check a formula of model.py directly: they fail too, but do not count as behavioural
FORMULA_TESTS = ('test_optimizer_groups_carry_lr_scale', 'test_init_std_scales_as_mup_says',
                 'test_experts_are_hidden_and_the_router_an_output_weight_by_shape',
                 'test_with_a_base_n_expert_the_number_of_experts_is_a_width',
                 'test_hidden_matrices_go_to_muon_without_the_width_rule',
                 'test_subclass_parameters_are_classified_by_shape', 'test_graph_parameters_are_not_hidden_and_get_gradients',
                 'test_untied_readout_starts_at_zero', 'test_router_and_fan_out_only_linear_are_classified_apart',
                 'test_untied_readout_keeps_the_base_lr_and_is_read_out_with_one_over_m',
                 'test_an_output_weight_in_a_block_takes_the_depth_rules_of_a_hidden_matrix')
MUP_TESTS = ['tests/test_output_weights.py', 'tests/test_mup.py', 'tests/test_model.py', 'tests/test_mods.py', 'tests/test_depth.py',
             'tests/test_muon.py', 'tests/test_graph_attention.py', 'tests/test_kv_cache.py', 'tests/test_modern_block.py',
             'tests/test_hf.py', 'tests/test_transfer.py', 'tests/test_moe.py']


def mutated_copy(name, into):
    """A copy of the project's code and tests in `into`, with mutation `name` applied."""
    for entry in os.listdir(ROOT):
        if entry.endswith('.py') or entry in ('tests', 'config', 'data', 'pytest.ini'):
            src = os.path.join(ROOT, entry)
            copy = shutil.copytree if os.path.isdir(src) else shutil.copy
            copy(src, os.path.join(into, entry), **(dict(ignore=shutil.ignore_patterns('*.bin', '*.pkl', 'input.txt',
                                                                                     '__pycache__')) if os.path.isdir(src) else {}))
    _, path, old, new = MUTATIONS[name]
    with open(os.path.join(into, path)) as f:
        text = f.read()
    if text.count(old) != 1:
        raise SystemExit(f"mutation {name}: its text occurs {text.count(old)} times in {path}, not once: update MUTATIONS")
    with open(os.path.join(into, path), 'w') as f:
        f.write(text.replace(old, new))


def failing_tests(name, tests, first=False):
    """The tests that fail under mutation `name`; first=True: only the first behavioural one."""
    options = []
    if first:
        options = ['-x', '-k', 'not (' + ' or '.join(FORMULA_TESTS) + ')']
    with tempfile.TemporaryDirectory(prefix=f'mutation_{name}_') as work:
        mutated_copy(name, work)
        proc = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-rf', '-p', 'no:randomly', *options, *tests],
                              cwd=work, capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    return sorted(set(re.findall(r'^FAILED tests/\S+?::(\w+)', proc.stdout, flags=re.M)))


USAGE = """usage: python tests/mutations.py [--first] [--only=NAME,NAME] [--all_tests]
  --first       stop each mutation's run at its first failing behavioural test (formula tests left out)
  --only=A,B    these mutations only (the names of MUTATIONS)
  --all_tests   run every test file, not only the muP ones"""


if __name__ == '__main__':
    if '--help' in sys.argv or '-h' in sys.argv:
        print(__doc__.strip() + '\n\n' + USAGE)
        sys.exit(0)
    unknown = [a for a in sys.argv[1:] if a.split('=', 1)[0] not in ('--first', '--only', '--all_tests')]
    if unknown:
        sys.exit(f"error: unknown argument {unknown[0]}\n{USAGE}")
    only = [a.split('=', 1)[1].split(',') for a in sys.argv[1:] if a.startswith('--only=')]
    names = only[0] if only else list(MUTATIONS)
    tests = ['tests'] if '--all_tests' in sys.argv else MUP_TESTS
    first = '--first' in sys.argv
    survivors = []
    print("| mutation | behavioural tests that fail | formula tests that fail |\n|---|---|---|")
    for name in names:
        failed = failing_tests(name, tests, first)
        behavioural = [t for t in failed if t not in FORMULA_TESTS]
        formula = [t for t in failed if t in FORMULA_TESTS]
        if not behavioural:
            survivors.append(name)
        print(f"| {name}: {MUTATIONS[name][0]} | {', '.join(behavioural) or '**none**'} | {', '.join(formula) or '-'} |",
              flush=True)
    if survivors:
        sys.exit(f"no behavioural test fails for: {', '.join(survivors)}")
