# Fine-tune GPT-2 small (124M) on Tiny Shakespeare in GPT-2's BPE (python data/shakespeare/prepare.py),
# as nanoGPT's config/finetune_shakespeare.py. init_from='gpt2' loads the weights with transformers;
# offline, save them where there is a network (GPT2LMHeadModel.from_pretrained('gpt2').save_pretrained(DIR))
# and pass --init_from=DIR. GPT-2's weights make an SP model (or muP with its own width as the base,
# the same model): docs/mup.md, "Into and out of Hugging Face".
out_dir = 'out-shakespeare'
dataset = 'shakespeare'
init_from = 'gpt2'
# GPT-2 small's architecture: init_from takes it from the checkpoint anyway; written here so that
# --init_from=resume builds the same model
n_layer, n_head, n_embd = 12, 12, 768
bias = True
mlp = 'gelu_tanh' # GPT-2's released weights use the tanh approximation of GELU (transformers' gelu_new)
block_size = 1024
eval_interval = 5
eval_iters = 40
always_save_checkpoint = False # only save checkpoints if the validation loss improves
# the number of examples per iter: 1 batch_size * 32 grad_accum * 1024 tokens = 32,768 tokens/iter;
# shakespeare has 301,966 tokens, so 1 epoch ~= 9.2 iters
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20
# finetune at a constant, small lr
learning_rate = 3e-5
decay_lr = False
