# podbay: installed as /etc/profile.d/podbay.sh in podbay's base image.
# /etc/profile resets PATH for login shells, dropping the directories the image adds (stack
# toolchains, e.g. a GEM_HOME bin). podbay-entrypoint passes the image's PATH to sshd as
# PODBAY_PATH; put back the directories that are missing, in front.
if [ -n "${PODBAY_PATH:-}" ]; then
  _podbay_add=
  _podbay_ifs=$IFS
  IFS=:
  for _podbay_dir in $PODBAY_PATH; do
    case ":$PATH:" in
      *":$_podbay_dir:"*) ;;
      *) _podbay_add="$_podbay_add$_podbay_dir:" ;;
    esac
  done
  IFS=$_podbay_ifs
  PATH="$_podbay_add$PATH"
  export PATH
  unset _podbay_add _podbay_ifs _podbay_dir
fi
