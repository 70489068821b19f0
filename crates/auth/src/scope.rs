//! SMART on FHIR system scopes for Backend Services.
//!
//! Grammar (SMART App Launch 2.0, "Scopes and Launch Context", and the v1 form it keeps):
//!
//! - v2: `system/<ResourceType|*>.<permissions>` where `<permissions>` is a non-empty subset of
//!   `c r u d s` written in that order (`system/Observation.rs`, `system/*.cruds`);
//! - v1: `system/<ResourceType|*>.read|write|*`, read as v2 `rs`, `cud` and `cruds` (the SMART 2.0
//!   mapping of v1 scopes).
//!
//! Only the `system/` context is accepted: `patient/` and `user/` scopes need a launch context
//! that Backend Services do not have (SMART Backend Services, "Scopes"). Granular v2 scopes with a
//! `?param=value` restriction are refused rather than silently widened, because the gateway has
//! no way to enforce the restriction.

use std::fmt;

/// Longest scope string we parse (RFC 6749 §3.3 sets no limit; we bound the work).
pub const MAX_SCOPE_LEN: usize = 4096;
/// Most scope tokens in one scope string.
pub const MAX_SCOPES: usize = 64;
/// Longest resource type name (FHIR R4's longest is 35 characters).
const MAX_RESOURCE_TYPE_LEN: usize = 64;

/// A FHIR interaction that a scope permits (the SMART v2 `c r u d s` letters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Interaction {
    /// `c`: create.
    Create,
    /// `r`: read and vread.
    Read,
    /// `u`: update and patch.
    Update,
    /// `d`: delete.
    Delete,
    /// `s`: search.
    Search,
}

impl Interaction {
    /// Every interaction, in SMART letter order.
    pub const ALL: [Interaction; 5] = [
        Self::Create,
        Self::Read,
        Self::Update,
        Self::Delete,
        Self::Search,
    ];

    fn bit(self) -> u8 {
        match self {
            Self::Create => 0b1_0000,
            Self::Read => 0b0_1000,
            Self::Update => 0b0_0100,
            Self::Delete => 0b0_0010,
            Self::Search => 0b0_0001,
        }
    }

    fn letter(self) -> char {
        match self {
            Self::Create => 'c',
            Self::Read => 'r',
            Self::Update => 'u',
            Self::Delete => 'd',
            Self::Search => 's',
        }
    }
}

/// Why a scope string was refused. The offending token is kept for configuration errors; the
/// token endpoint does not echo it to clients.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    /// No scope tokens at all.
    #[error("no scopes given")]
    Empty,
    /// More than [`MAX_SCOPE_LEN`] bytes or [`MAX_SCOPES`] tokens.
    #[error("too many scopes")]
    TooLarge,
    /// `patient/`, `user/`, `openid`, `launch` and the like: not for Backend Services.
    #[error("scope {0:?} is not a system/ scope")]
    NotSystem(String),
    /// A v2 scope with a `?` restriction.
    #[error("scope {0:?} uses granular parameters, which are not supported")]
    Granular(String),
    /// Anything else that does not follow the grammar.
    #[error("scope {0:?} is malformed")]
    Malformed(String),
}

/// The resource types a scope covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Target {
    /// `*`: every resource type.
    All,
    /// One resource type.
    Type(String),
}

impl Target {
    fn covers(&self, resource_type: &str) -> bool {
        match self {
            Self::All => true,
            Self::Type(own) => own == resource_type,
        }
    }
}

/// One parsed scope token.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Scope {
    /// The token as received, so a grant echoes the client's own spelling.
    text: String,
    target: Target,
    /// One bit per [`Interaction`].
    permissions: u8,
}

/// A validated, de-duplicated set of SMART system scopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeSet {
    scopes: Vec<Scope>,
}

impl ScopeSet {
    /// Parses a space-delimited scope string (RFC 6749 §3.3).
    pub fn parse(input: &str) -> Result<ScopeSet, ScopeError> {
        if input.len() > MAX_SCOPE_LEN {
            return Err(ScopeError::TooLarge);
        }
        let mut scopes: Vec<Scope> = Vec::new();
        for token in input.split_ascii_whitespace() {
            if scopes.iter().any(|known| known.text == token) {
                continue;
            }
            if scopes.len() == MAX_SCOPES {
                return Err(ScopeError::TooLarge);
            }
            scopes.push(parse_scope(token)?);
        }
        if scopes.is_empty() {
            return Err(ScopeError::Empty);
        }
        Ok(ScopeSet { scopes })
    }

    /// Whether some scope in the set permits `interaction` on `resource_type`.
    pub fn allows(&self, resource_type: &str, interaction: Interaction) -> bool {
        self.scopes.iter().any(|scope| {
            scope.target.covers(resource_type) && scope.permissions & interaction.bit() != 0
        })
    }

    /// Whether everything this set permits, `other` permits too. Checked per interaction, so
    /// `system/Observation.rs` ⊆ `system/Observation.r system/Observation.s`; a `*` scope is only
    /// covered by a `*` scope, because no finite list of types covers every type.
    pub fn is_subset_of(&self, other: &ScopeSet) -> bool {
        self.scopes.iter().all(|scope| {
            Interaction::ALL
                .iter()
                .filter(|i| scope.permissions & i.bit() != 0)
                .all(|&i| {
                    other.scopes.iter().any(|theirs| {
                        theirs.permissions & i.bit() != 0
                            && match (&theirs.target, &scope.target) {
                                (Target::All, _) => true,
                                (Target::Type(theirs), Target::Type(ours)) => theirs == ours,
                                (Target::Type(_), Target::All) => false,
                            }
                    })
                })
        })
    }

    /// The scope tokens in the order first received.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.scopes.iter().map(|scope| scope.text.as_str())
    }
}

impl fmt::Display for ScopeSet {
    /// The space-delimited form used in token responses and the access token's `scope` claim.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, scope) in self.scopes.iter().enumerate() {
            if index > 0 {
                f.write_str(" ")?;
            }
            f.write_str(&scope.text)?;
        }
        Ok(())
    }
}

fn parse_scope(token: &str) -> Result<Scope, ScopeError> {
    let malformed = || ScopeError::Malformed(token.to_owned());
    let Some(rest) = token.strip_prefix("system/") else {
        return Err(ScopeError::NotSystem(token.to_owned()));
    };
    if token.contains('?') {
        return Err(ScopeError::Granular(token.to_owned()));
    }
    let (resource, permissions) = rest.split_once('.').ok_or_else(malformed)?;
    let target = if resource == "*" {
        Target::All
    } else if is_resource_type(resource) {
        Target::Type(resource.to_owned())
    } else {
        return Err(malformed());
    };
    let permissions = match permissions {
        "read" => Interaction::Read.bit() | Interaction::Search.bit(),
        "write" => {
            Interaction::Create.bit() | Interaction::Update.bit() | Interaction::Delete.bit()
        }
        "*" => Interaction::ALL.iter().fold(0, |bits, i| bits | i.bit()),
        letters => parse_v2_permissions(letters).ok_or_else(malformed)?,
    };
    Ok(Scope {
        text: token.to_owned(),
        target,
        permissions,
    })
}

/// A FHIR resource type name: an upper-case ASCII letter followed by ASCII letters.
fn is_resource_type(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= MAX_RESOURCE_TYPE_LEN
        && chars.next().is_some_and(|first| first.is_ascii_uppercase())
        && chars.all(|c| c.is_ascii_alphabetic())
}

/// `cruds` letters, non-empty, each at most once and in SMART order.
fn parse_v2_permissions(letters: &str) -> Option<u8> {
    let mut bits = 0u8;
    let mut remaining = Interaction::ALL.iter();
    for letter in letters.chars() {
        let interaction = remaining.by_ref().find(|i| i.letter() == letter)?;
        bits |= interaction.bit();
    }
    (bits != 0).then_some(bits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(text: &str) -> ScopeSet {
        ScopeSet::parse(text).expect("valid scope")
    }

    #[test]
    fn smart_v2_parses_cruds_in_order() {
        let scopes = set("system/Observation.cruds");
        for i in Interaction::ALL {
            assert!(scopes.allows("Observation", i));
            assert!(!scopes.allows("Patient", i));
        }
        assert!(set("system/Observation.rs").allows("Observation", Interaction::Search));
        assert!(!set("system/Observation.rs").allows("Observation", Interaction::Create));
    }

    #[test]
    fn smart_v2_rejects_out_of_order_repeated_or_unknown_letters() {
        for bad in [
            "system/Observation.sr",
            "system/Observation.rr",
            "system/Observation.x",
            "system/Observation.",
            "system/Observation",
            "system/observation.r",
            "system/.r",
            "system/Obs-ervation.r",
        ] {
            assert!(
                matches!(ScopeSet::parse(bad), Err(ScopeError::Malformed(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn smart_v1_read_write_star_map_to_v2() {
        let read = set("system/Patient.read");
        assert!(read.allows("Patient", Interaction::Read));
        assert!(read.allows("Patient", Interaction::Search));
        assert!(!read.allows("Patient", Interaction::Update));
        let write = set("system/Patient.write");
        assert!(write.allows("Patient", Interaction::Create));
        assert!(write.allows("Patient", Interaction::Delete));
        assert!(!write.allows("Patient", Interaction::Read));
        assert!(set("system/*.*").allows("Anything", Interaction::Delete));
        assert!(set("system/Patient.read").is_subset_of(&set("system/Patient.rs")));
        assert!(set("system/Patient.rs").is_subset_of(&set("system/Patient.read")));
    }

    #[test]
    fn smart_backend_services_accepts_only_system_context() {
        for bad in [
            "patient/Observation.rs",
            "user/*.cruds",
            "openid",
            "launch",
            "offline_access",
        ] {
            assert!(
                matches!(ScopeSet::parse(bad), Err(ScopeError::NotSystem(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            ScopeSet::parse("system/Observation.rs?category=laboratory"),
            Err(ScopeError::Granular(_))
        ));
    }

    #[test]
    fn rfc6749_3_3_empty_and_oversized_scope_strings_are_refused() {
        assert_eq!(ScopeSet::parse(""), Err(ScopeError::Empty));
        assert_eq!(ScopeSet::parse("   "), Err(ScopeError::Empty));
        assert_eq!(
            ScopeSet::parse(&"x".repeat(MAX_SCOPE_LEN + 1)),
            Err(ScopeError::TooLarge)
        );
        let many: Vec<String> = (0..=MAX_SCOPES)
            .map(|n| format!("system/T{}.r", "a".repeat(n)))
            .collect();
        assert_eq!(ScopeSet::parse(&many.join(" ")), Err(ScopeError::TooLarge));
    }

    #[test]
    fn scope_set_deduplicates_and_displays_in_received_order() {
        let scopes = set("system/Patient.r  system/Observation.rs system/Patient.r");
        assert_eq!(scopes.to_string(), "system/Patient.r system/Observation.rs");
        assert_eq!(scopes.iter().count(), 2);
    }

    #[test]
    fn smart_subset_rules() {
        assert!(set("system/Observation.c").is_subset_of(&set("system/*.cruds")));
        assert!(!set("system/*.rs").is_subset_of(&set("system/Observation.rs")));
        assert!(
            set("system/Observation.rs")
                .is_subset_of(&set("system/Observation.r system/Observation.s"))
        );
        assert!(!set("system/Observation.rs").is_subset_of(&set("system/Observation.r")));
        assert!(!set("system/Patient.r").is_subset_of(&set("system/Observation.cruds")));
        assert!(set("system/*.r").is_subset_of(&set("system/*.rs system/Patient.c")));
    }

    fn scope_token() -> impl Strategy<Value = String> {
        let target = prop_oneof![
            Just("*"),
            Just("Observation"),
            Just("Patient"),
            Just("Condition")
        ];
        let v2 = (1u8..32).prop_map(|bits| {
            Interaction::ALL
                .iter()
                .filter(|i| bits & i.bit() != 0)
                .map(|i| i.letter())
                .collect::<String>()
        });
        let permissions = prop_oneof![
            v2,
            Just("read".to_owned()),
            Just("write".to_owned()),
            Just("*".to_owned())
        ];
        (target, permissions).prop_map(|(t, p)| format!("system/{t}.{p}"))
    }

    fn scope_set() -> impl Strategy<Value = ScopeSet> {
        proptest::collection::vec(scope_token(), 1..5).prop_map(|tokens| set(&tokens.join(" ")))
    }

    proptest! {
        /// `a ⊆ b` exactly when every (type, interaction) that `a` allows, `b` allows; a type
        /// neither set names stands in for "every other type" behind `*`.
        #[test]
        fn smart_subset_is_consistent_with_allows(a in scope_set(), b in scope_set()) {
            let witnesses = ["Observation", "Patient", "Condition", "Encounter"];
            let by_allows = witnesses.iter().all(|t| {
                Interaction::ALL.iter().all(|&i| !a.allows(t, i) || b.allows(t, i))
            });
            prop_assert_eq!(a.is_subset_of(&b), by_allows);
        }

        #[test]
        fn scope_display_round_trips(a in scope_set()) {
            prop_assert_eq!(ScopeSet::parse(&a.to_string()), Ok(a));
        }
    }
}
