"""Preference tuning of Stable Diffusion on the feedback itself, with no critic: a LoRA trained by
Diffusion-DPO on preference pairs or by Diffusion-KTO on liked / not-liked images.

- `objectives`: the two losses and the implicit reward they share, on per-example denoising errors;
- `step`: one micro-batch: images to latents, the tuned and the reference model's errors, the loss;
- `data`: the feedback as a deterministic stream of micro-batches (pairs or labelled images, streamed by
  reward.data's readers);
- `config`: PreferenceConfig; `train`: the loop; `card`: the model card; `cli`: the command.
"""
