import torch, kernel_moe
from transformers import JetMoeConfig, JetMoeForCausalLM
cfg = JetMoeConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_key_value_heads=2, kv_channels=8, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
print(cfg._attn_implementation, cfg.num_attention_heads)
torch.manual_seed(0)
m = JetMoeForCausalLM(cfg).eval()
print(m.model.layers[0].self_attention)
m2, rep = kernel_moe.optimize(m, return_report=True)
print(rep)
import copy
torch.manual_seed(0)
m = JetMoeForCausalLM(cfg).eval()
ref = copy.deepcopy(m)
ids = torch.randint(0, 97, (2, 11))
m2, rep = kernel_moe.optimize(m, return_report=True)
print(rep)
with torch.no_grad():
    a = ref(ids).logits; b = m2(ids).logits
print((a-b).abs().max())
g1 = ref.generate(ids[:1], max_new_tokens=8, do_sample=False); g2 = m2.generate(ids[:1], max_new_tokens=8, do_sample=False)
print(g1, g2, torch.equal(g1, g2))
