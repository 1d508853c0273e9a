"""`jaxscale plan`: the layouts (mesh, remat, microbatches, host offload) that fit a device, ranked by a roofline
step time; `--set plan=auto` trains the top one."""
