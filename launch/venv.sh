# Sourced by the launch scripts (with $root set to the checkout): which of the checkout's
# virtual environments to use, in $venv. .venv holds the tested versions (constraints.txt);
# with NNSIGHT_DIST_LATEST=1, .venv-latest holds the newest releases, so checking those never
# disturbs the pinned environment.
case "${NNSIGHT_DIST_LATEST:-0}" in
  0) venv="$root/.venv" ;;
  1) venv="$root/.venv-latest" ;;
  *) echo "NNSIGHT_DIST_LATEST must be 0 or 1, not '${NNSIGHT_DIST_LATEST}'" >&2; exit 2 ;;
esac
