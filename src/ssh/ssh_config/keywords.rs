//! The keywords OpenSSH's client accepts in ssh_config, lowercased.
//!
//! The list is `keywords[]` of an OpenSSH 9.x `readconf.c`, plus keywords of later
//! releases (`ChannelTimeout`, `EnableEscapeCommandline`, `ObscureKeystrokeTiming`, `Tag`,
//! `RefuseConnection`, `WarnWeakCrypto`), Debian's GSSAPI key-exchange patch and Apple's
//! `UseKeychain`, which appear in real configuration files. A keyword outside this list
//! is a typo as far as arcfleet can tell.
//!
//! NOTE: keywords that OpenSSH adds after these get a typo warning until they are listed
//! here; `IgnoreUnknown` silences it.

const OPENSSH_KEYWORDS: &[&str] = &[
    "addkeystoagent",
    "addressfamily",
    "afstokenpassing",
    "batchmode",
    "bindaddress",
    "bindinterface",
    "canonicaldomains",
    "canonicalizefallbacklocal",
    "canonicalizehostname",
    "canonicalizemaxdots",
    "canonicalizepermittedcnames",
    "casignaturealgorithms",
    "certificatefile",
    "challengeresponseauthentication",
    "channeltimeout",
    "checkhostip",
    "cipher",
    "ciphers",
    "clearallforwardings",
    "compression",
    "compressionlevel",
    "connectionattempts",
    "connecttimeout",
    "controlmaster",
    "controlpath",
    "controlpersist",
    "dsaauthentication",
    "dynamicforward",
    "enableescapecommandline",
    "enablesshkeysign",
    "escapechar",
    "exitonforwardfailure",
    "fallbacktorsh",
    "fingerprinthash",
    "forkafterauthentication",
    "forwardagent",
    "forwardx11",
    "forwardx11timeout",
    "forwardx11trusted",
    "gatewayports",
    "globalknownhostsfile",
    "globalknownhostsfile2",
    "gssapiauthentication",
    "gssapiclientidentity",
    "gssapidelegatecredentials",
    "gssapikexalgorithms",
    "gssapikeyexchange",
    "gssapirenewalforcesrekey",
    "gssapiserveridentity",
    "gssapitrustdns",
    "hashknownhosts",
    "host",
    "hostbasedacceptedalgorithms",
    "hostbasedauthentication",
    "hostbasedkeytypes",
    "hostkeyalgorithms",
    "hostkeyalias",
    "hostname",
    "identitiesonly",
    "identityagent",
    "identityfile",
    "identityfile2",
    "ignoreunknown",
    "include",
    "ipqos",
    "kbdinteractiveauthentication",
    "kbdinteractivedevices",
    "keepalive",
    "kerberosauthentication",
    "kerberostgtpassing",
    "kexalgorithms",
    "knownhostscommand",
    "localcommand",
    "localforward",
    "loglevel",
    "logverbose",
    "macs",
    "match",
    "nohostauthenticationforlocalhost",
    "numberofpasswordprompts",
    "obscurekeystroketiming",
    "passwordauthentication",
    "permitlocalcommand",
    "permitremoteopen",
    "pkcs11provider",
    "port",
    "preferredauthentications",
    "protocol",
    "proxycommand",
    "proxyjump",
    "proxyusefdpass",
    "pubkeyacceptedalgorithms",
    "pubkeyacceptedkeytypes",
    "pubkeyauthentication",
    "refuseconnection",
    "rekeylimit",
    "remotecommand",
    "remoteforward",
    "requestty",
    "requiredrsasize",
    "revokedhostkeys",
    "rhostsauthentication",
    "rhostsrsaauthentication",
    "rsaauthentication",
    "securitykeyprovider",
    "sendenv",
    "serveralivecountmax",
    "serveraliveinterval",
    "sessiontype",
    "setenv",
    "skeyauthentication",
    "smartcarddevice",
    "stdinnull",
    "streamlocalbindmask",
    "streamlocalbindunlink",
    "stricthostkeychecking",
    "syslogfacility",
    "tag",
    "tcpkeepalive",
    "tisauthentication",
    "tunnel",
    "tunneldevice",
    "updatehostkeys",
    "usekeychain",
    "useprivilegedport",
    "user",
    "userknownhostsfile",
    "userknownhostsfile2",
    "useroaming",
    "usersh",
    "verifyhostkeydns",
    "visualhostkey",
    "warnweakcrypto",
    "xauthlocation",
];

/// Returns whether OpenSSH's client knows the (lowercased) keyword.
pub fn is_openssh_keyword(keyword: &str) -> bool {
    OPENSSH_KEYWORDS.binary_search(&keyword).is_ok()
}

/// Returns the known keyword closest to a misspelt one, when it is at most two edits away.
pub fn closest_keyword(keyword: &str) -> Option<&'static str> {
    OPENSSH_KEYWORDS
        .iter()
        .map(|known| (edit_distance(keyword, known), *known))
        .filter(|(distance, _)| *distance <= 2)
        .min()
        .map(|(_, known)| known)
}

/// Levenshtein distance between two short ASCII words.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_is_sorted_for_binary_search() {
        let mut sorted = OPENSSH_KEYWORDS.to_vec();
        sorted.sort_unstable();
        assert_eq!(sorted, OPENSSH_KEYWORDS);
    }

    #[test]
    fn typo_suggests_keyword() {
        assert!(is_openssh_keyword("identityfile"));
        assert!(!is_openssh_keyword("identifyfile"));
        assert_eq!(closest_keyword("identifyfile"), Some("identityfile"));
        assert_eq!(closest_keyword("prxyjump"), Some("proxyjump"));
        assert_eq!(closest_keyword("completelywrong"), None);
    }
}
