# bash completion for edgesync; generated from `edgesync help` by `EDGESYNC_BLESS=1 cargo test --bin edgesync generated` (src/cli/docs.rs); do not edit.

_edgesync() {
    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]}
    case $prev in
        --config|-c) COMPREPLY=($(compgen -f -- "$cur")); return ;;
        --every|--from|--keys|--limit|--skip) return ;;
    esac
    local cmd="" sub="" i
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${COMP_WORDS[i]} in
            --config|-c|--every|--from|--keys|--limit|--skip) ((i++)) ;;
            -*) ;;
            *) if [ -z "$cmd" ]; then cmd=${COMP_WORDS[i]}; elif [ -z "$sub" ]; then sub=${COMP_WORDS[i]}; fi ;;
        esac
    done
    if [ "$cmd" = queue ] && [ "$sub" = export ]; then
        COMPREPLY=($(compgen -f -- "$cur")); return
    fi
    local words
    case $cmd in
        "") words="run report status get history rollback check-config queue reconnect estimate help -c --config -h --help -V --version" ;;
        run) words="-c --config -h --help -V --version" ;;
        report) words="-c --config -h --help -V --version --stdin -q --quiet" ;;
        status) words="-c --config -h --help -V --version --json" ;;
        get) words="$([ -z "$sub" ] && echo desired reported) -c --config -h --help -V --version" ;;
        history) words="-c --config -h --help -V --version --limit --json" ;;
        rollback) words="-c --config -h --help -V --version" ;;
        check-config) words="-c --config -h --help -V --version" ;;
        queue) words="$([ -z "$sub" ] && echo stats peek export) -c --config -h --help -V --version --json --from --limit" ;;
        reconnect) words="-c --config -h --help -V --version" ;;
        estimate) words="-c --config -h --help -V --version --keys --every --skip --spread" ;;
        help) words="$([ -z "$sub" ] && echo run report status get history rollback check-config queue reconnect estimate) " ;;
        *) words="" ;;
    esac
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}
complete -F _edgesync edgesync
