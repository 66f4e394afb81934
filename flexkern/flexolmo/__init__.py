"""FlexOlmo on flexkern: a public anchor model, independently trained owner experts, merge, opt-out.

Map (each module one job; import them directly, nothing heavy is imported here):
    model         FlexOlmoLM (OLMo-2-style decoder, dense FFN or FlexMoE), presets, fingerprint
    data          the six example domains and owners' folders; train/held-out split; the public mix
    tokenizer     byte-level BPE trained on the public data
    embed         domain embeddings for router rows (MiniLM or the anchor's hidden states)
    train         train_anchor, train_expert (single process or torchrun/DDP, resumable)
    package       expert packages NAME.flexpert/ (safetensors + manifest, verified)
    merge         merge, load_model, opt_out, opt_in, mask_experts
    checkpoint    atomic, hash-verified model directories and files
    distributed   torchrun process-group set-up
    proxy         proxy sets: owner-vs-public logistic regression on sentence embeddings
    router_tuning router tuning on proxy sets (the one implementation: CLI and demo)
    eval_suite    held-out / short-context / mixed-domain sets, bootstrap intervals, paired tests
    attribution   per-token provenance (each expert's share of the FFN output), HTML + PNG
    generate      greedy / top-p generation, with experts opted out
    variants      the extension (public-router loss) and the ablations, extra seeds
    evaluate, baselines, report, demo   streams and losses, soups and BTM, the report, the demo
    commands      what the CLI's evaluate and tune-router call (a model directory in, results out)
    defaults      the commands' default settings, torch-free (the CLI's --help reads them)
"""
