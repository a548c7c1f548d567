# session 19, call 1 (carry .peers), on 1a8528f: the command was
#   bash docs/perf/2026-12-06-h100-session18/next_c1_script.sh
# (that file, unchanged since 1a8528f: CUDA tests, the four-way A/B of experts.READ_TOKENS_IN_PLACE /
# READ_GRADIENT_IN_PLACE on OLMoE and the small MoE, then the peers). What came back is in c1/.
