# podbay: BASH_ENV of non-interactive SSH sessions (`ssh host 'make test'`): run the command in
# /workspace, where interactive logins land too. Unset at once, so scripts the command starts
# keep their own working directory.
unset BASH_ENV
if [ "$PWD" = "$HOME" ] && [ -d /workspace ]; then cd /workspace || true; fi
