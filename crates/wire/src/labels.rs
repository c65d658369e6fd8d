//! [`labelled_enum!`]: an enum whose variants each carry a metric label,
//! with the label table and the index into it derived from that one list.

/// Declares an enum whose variants each carry a label (a `&'static str`
/// constant expression: a literal, or another labelled enum's `label()`),
/// and derives from that one list:
///
/// - `LABELS`: every label, in declaration order;
/// - `index()`: the variant's position in that order, so that
///   `LABELS[x.index()] == x.label()` (a metric family's handles can be an
///   array indexed by it);
/// - `label()`.
///
/// Variants may hold data; the label belongs to the variant, whatever the
/// data.
///
/// ```
/// wire::labelled_enum! {
///     #[derive(Clone, Copy, Debug, PartialEq, Eq)]
///     pub enum Door {
///         Open => "open",
///         Locked(u8) => "locked",
///     }
/// }
/// assert_eq!(Door::LABELS, ["open", "locked"]);
/// assert_eq!(Door::Locked(3).index(), 1);
/// assert_eq!(Door::Locked(3).label(), "locked");
/// ```
#[macro_export]
macro_rules! labelled_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $(
                $(#[$vmeta:meta])*
                $variant:ident $(($($field:ty),+ $(,)?))? => $label:expr
            ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        $vis enum $name {
            $( $(#[$vmeta])* $variant $(($($field),+))?, )+
        }

        impl $name {
            /// Every variant's label, in declaration order (indexed by
            /// [`index`](Self::index)).
            pub const LABELS: [&'static str; {
                let labels: &[&str] = &[$($label),+];
                labels.len()
            }] = [$($label),+];

            /// The variant's position in declaration order:
            /// `LABELS[self.index()] == self.label()`.
            pub const fn index(&self) -> usize {
                #[allow(dead_code)]
                #[repr(usize)]
                enum Index {
                    $($variant),+
                }
                match self {
                    $( Self::$variant { .. } => Index::$variant as usize, )+
                }
            }

            /// The variant's label.
            pub const fn label(&self) -> &'static str {
                Self::LABELS[self.index()]
            }
        }
    };
}

#[cfg(test)]
mod tests {
    labelled_enum! {
        /// Unit and data variants, attributes kept.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        enum Sample {
            First => "first",
            /// A documented variant with data.
            Second(u32) => "second",
            Third(u8, char) => "third",
        }
    }

    labelled_enum! {
        #[derive(Clone, Copy, Debug)]
        enum Borrowing {
            Other => "other",
            Same => Sample::First.label(),
        }
    }

    #[test]
    fn index_and_labels_follow_declaration_order() {
        assert_eq!(Sample::LABELS, ["first", "second", "third"]);
        let all = [Sample::First, Sample::Second(7), Sample::Third(1, 'x')];
        for (position, sample) in all.iter().enumerate() {
            assert_eq!(sample.index(), position);
            assert_eq!(sample.label(), Sample::LABELS[position]);
        }
        assert_eq!(Sample::Second(0).index(), Sample::Second(u32::MAX).index());
    }

    #[test]
    fn a_label_can_be_another_enums_label() {
        assert_eq!(Borrowing::LABELS, ["other", "first"]);
        assert_eq!(Borrowing::Same.label(), "first");
        assert_eq!(Borrowing::Other.index(), 0);
    }
}
